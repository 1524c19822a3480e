"""Convergence metrics and the study summary, on real Parquet files and a real small study."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.__main__ import main
from pipeline.config import ConvergenceConfig
from pipeline.results.metrics import steps_to_converge, trial_metrics
from pipeline.results.tables import STATE_OF_STATUS, TRIALS_METADATA_KEY, load_steps
from pipeline.summary.groups import loss_curves
from pipeline.summary.survival import kaplan_meier, wilson_interval
from pipeline.summary.words import render_markdown
from pipeline.summary.write import summarize, write_summary
from tests.conftest import SMALL, study_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS_OF_A_RUN = [
    "plots/loss_curves.png",
    "plots/steps_to_converge.png",
    "plots/converged_fraction.png",
    "plots/time_to_converge.png",
]


@pytest.fixture(scope="module")
def study(finished_study):
    """The session's finished study (conftest.finished_study): 8 trials, read only."""
    return finished_study.config


@pytest.fixture(scope="module")
def summary(study):
    return write_summary(study.output)


def test_steps_to_converge_is_none_when_the_mean_never_falls_below_the_threshold():
    losses = np.full(500, 0.3)
    assert steps_to_converge(losses, threshold=0.1, window=100) is None


def test_steps_to_converge_is_the_first_step_whose_trailing_window_mean_is_below():
    losses = np.array([0.9, 0.3, 0.0, 0.0, 0.0, 0.0])
    # Means over (s - 3, s]: s=2 → 0.4, s=3 → 0.1, s=4 → 0.0; the first below 0.05 is s=4.
    assert steps_to_converge(losses, threshold=0.05, window=3) == 4
    assert steps_to_converge(losses, threshold=0.2, window=3) == 3


def test_steps_to_converge_needs_the_mean_strictly_below_the_threshold():
    assert steps_to_converge(np.full(10, 0.5), threshold=0.5, window=2) is None


def test_steps_to_converge_never_counts_a_window_that_holds_a_nan():
    losses = np.array([1.0, np.nan, 0.0, 0.0, 0.0])
    # (0, 2] holds the NaN, so the first window wholly after it, (1, 3], is the first that counts.
    assert steps_to_converge(losses, threshold=0.1, window=2) == 3


def test_steps_to_converge_is_none_for_a_series_shorter_than_the_window():
    assert steps_to_converge(np.zeros(99), threshold=0.1, window=100) is None


def test_trial_metrics_final_loss_is_the_mean_over_the_last_epoch_reached():
    losses = np.concatenate([np.full(100, 0.6), np.full(100, 0.4), np.full(50, 0.2)])
    metrics = trial_metrics(losses, 100, ConvergenceConfig(threshold=0.305, window=20))
    # A trial pruned in its third epoch: its final loss is over the 50 steps of that epoch.
    assert metrics.final_loss == pytest.approx(0.2)
    assert metrics.mean_loss == pytest.approx(0.44)
    # The 20-step mean is 0.31 at step 208 and 0.3 at step 209 (ten steps at 0.2 in it).
    assert metrics.steps_to_converge == 209 and metrics.converged


def _hand_made_trials(rows: list[tuple], **columns: object) -> pd.DataFrame:
    """Trials of 1 layer × 4 units, each (status, echo_step, final_loss, steps_to_converge,
    steps run); the study_config run is 2 epochs of 100 windows (200 steps)."""
    names = ["status", "echo_step", "final_loss", "steps_to_converge", "steps"]
    trials = pd.DataFrame(rows, columns=names)
    return trials.assign(
        trial=range(len(trials)),
        state=trials["status"].map(STATE_OF_STATUS),
        num_layers=1,
        state_size=4,
        error=None,
        converged=trials["steps_to_converge"].notna(),
        steps_to_converge=trials["steps_to_converge"].astype("Int64"),
        **columns,
    )


def test_summarize_counts_a_diverged_trial_as_trained_but_never_converged(tmp_path):
    trials = _hand_made_trials(
        [
            ("complete", 3, 0.01, 40, 200),
            # Its moving average fell below the threshold before the loss became infinite; its
            # final loss is finite (the mean over an epoch that ended before it diverged), so
            # only leaving FAIL trials out keeps it from the median final loss.
            ("diverged", 3, 0.5, 30, 90),
        ]
    )
    row = summarize(study_config(tmp_path), trials).table.iloc[0]
    assert (row["trials"], row["failed"], row["diverged"], row["trained"]) == (2, 1, 1, 2)
    assert row["converged"] == 1 and row["converged_fraction"] == 0.5
    # Half converged by step 40, and the diverged one never will: the median is step 40.
    assert row["median_steps_to_converge"] == 40
    # The median final loss is over COMPLETE and PRUNED trials: a diverged one is FAIL.
    assert row["median_final_loss"] == pytest.approx(0.01)


def test_summarize_leaves_trials_that_raised_out_of_the_converged_fraction(tmp_path):
    trials = _hand_made_trials([("complete", 3, 0.01, 40, 200), ("error", 3, np.nan, None, 0)])
    summary = summarize(study_config(tmp_path), trials)
    row = summary.table.iloc[0]
    assert (row["trials"], row["failed"], row["diverged"], row["trained"]) == (2, 1, 0, 1)
    assert row["converged_fraction"] == 1.0
    assert any("1 raised an error" in sentence for sentence in summary.findings)


def test_summarize_median_without_censoring_is_the_ordinary_median(tmp_path):
    steps = [100, 20, 30, 50, 40]
    trials = _hand_made_trials([("complete", 3, 0.01, s, 200) for s in steps])
    row = summarize(study_config(tmp_path), trials).table.iloc[0]
    assert row["median_steps_to_converge"] == np.median(steps)
    trials = _hand_made_trials([("complete", 3, 0.01, s, 200) for s in steps[:4]])
    # An even count: the midpoint of the two middle steps, as numpy's median.
    row = summarize(study_config(tmp_path), trials).table.iloc[0]
    assert row["median_steps_to_converge"] == np.median(steps[:4]) == 40


def test_summarize_median_of_a_group_where_fewer_than_half_converged_prints_beyond(tmp_path):
    trials = _hand_made_trials(
        [("complete", 3, 0.01, 50, 200)] + [("complete", 3, 0.6, None, 200)] * 2
    )
    summary = summarize(study_config(tmp_path), trials)
    row = summary.table.iloc[0]
    # 1 of 3 converged: no median, and the horizon is the last step, 199.
    assert pd.isna(row["median_steps_to_converge"]) and row["horizon_step"] == 199
    markdown = render_markdown(summary)
    assert "| > 199 |" in markdown or "| > 199 [" in markdown


def test_summarize_pruned_trial_is_censored_where_it_stopped(tmp_path):
    # Two converged, one pruned at step 59 before it converged, one never converged.
    trials = _hand_made_trials(
        [
            ("complete", 3, 0.01, 40, 200),
            ("complete", 3, 0.01, 100, 200),
            ("pruned", 3, 0.5, None, 60),
            ("complete", 3, 0.6, None, 200),
        ]
    )
    row = summarize(study_config(tmp_path), trials).table.iloc[0]
    # Kaplan–Meier: 1/4 by step 40; the pruned trial leaves the risk set at 59; then 1 of the 2
    # still at risk converges at 100: 1 - (3/4)(1/2) = 5/8, more than the plain 2 of 4.
    assert row["converged"] == 2 and row["converged_fraction"] == pytest.approx(5 / 8)
    assert row["median_steps_to_converge"] == 100


def test_summarize_intervals_contain_their_estimates(tmp_path):
    rows = [("complete", 3, 0.01, 20 + 7 * k, 200) for k in range(12)]
    rows += [("complete", 3, 0.6, None, 200)] * 4 + [("pruned", 3, 0.5, None, 80)] * 2
    rows += [("complete", 9, 0.6, None, 200)] * 3 + [("complete", 1, 0.01, 30, 200)] * 5
    table = summarize(study_config(tmp_path), _hand_made_trials(rows)).table
    assert (table["converged_fraction_low"] <= table["converged_fraction"]).all()
    assert (table["converged_fraction"] <= table["converged_fraction_high"]).all()
    # A fraction of 0 or 1 still has an interval of positive width.
    assert (table["converged_fraction_high"] > table["converged_fraction_low"]).all()
    medians = table.dropna(subset=["median_steps_to_converge_high"])
    assert len(medians) >= 1
    assert (medians["median_steps_to_converge_low"] <= medians["median_steps_to_converge"]).all()
    assert (medians["median_steps_to_converge"] <= medians["median_steps_to_converge_high"]).all()


def test_wilson_interval_matches_the_textbook_value():
    # Wilson's interval of 8/10 at 95 %: (0.4902, 0.9433), as in Agresti and Coull (1998).
    low, high = wilson_interval(0.8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)


def test_kaplan_meier_without_censoring_is_the_empirical_fraction():
    steps = np.array([5, 3, 9, 9, 12])
    curve = kaplan_meier(steps, np.array([True, True, True, False, False]))
    assert curve.fraction_by(4) == pytest.approx(0.2)
    # At a tied step a convergence counts before a censoring: 3 of 5 by step 9.
    assert curve.fraction_by(9) == pytest.approx(0.6) and curve.final == pytest.approx(0.6)
    assert curve.horizon == 12 and sorted(curve.censored) == [9, 12]


# z² of a 95 % interval: Wilson's interval of a fraction 1 (or 0) in n trials has its other end
# at n / (n + z²) (or z² / (n + z²)).
Z2 = 1.959963984540054**2


def test_kaplan_meier_interval_at_zero_survivors_is_as_wide_as_the_trials_followed():
    # 9 pruned at step 100, 1 followed on and converged at 500: the estimate is 1, on one trial.
    curve = kaplan_meier(np.array([100] * 9 + [500]), np.array([False] * 9 + [True]))
    low, high = curve.final_interval
    # At 0 survivors the effective sample size is the one trial followed, not all ten.
    assert curve.final == 1.0 and high == 1.0
    assert low == pytest.approx(1 / (1 + Z2)) and round(low, 2) == 0.21


THREE_PRUNED_THREE_FOLLOWED = (
    np.array([1700] * 3 + [1800, 1900, 2000]),
    np.array([False] * 3 + [True] * 3),
)


def test_kaplan_meier_median_upper_limit_at_zero_survivors_of_three_followed_is_beyond():
    # 3 pruned at 1700; the 3 followed on converge at 1800, 1900 and 2000.
    curve = kaplan_meier(*THREE_PRUNED_THREE_FOLLOWED)
    # Three trials followed cannot put the median below 2000 with 95 % confidence: no upper limit
    # (NaN: beyond the horizon).
    assert np.isnan(curve.median_interval()[1])
    assert curve.final_interval[0] == pytest.approx(3 / (3 + Z2))


def test_kaplan_meier_interval_with_none_converged_is_as_wide_as_the_trials_followed():
    # 9 of 10 pruned at step 100, 1 followed to step 500, none converged.
    curve = kaplan_meier(np.array([100] * 9 + [500]), np.array([False] * 10))
    low, high = curve.final_interval
    # Nothing converged among the one trial followed to the end: the interval is one trial's.
    assert low == 0.0 and high == pytest.approx(Z2 / (1 + Z2)) and round(high, 2) == 0.79


def test_kaplan_meier_median_lower_limit_of_three_trials_is_unbounded():
    curve = kaplan_meier(np.array([50, 60, 70]), np.array([True] * 3))
    # With 3 trials the band's upper end is z² / (3 + z²) = 0.56 before any converged, so the
    # median may lie anywhere from step 0 (and 3 of 3 cannot bound it above: 3 / (3 + z²) < ½).
    np.testing.assert_array_equal(curve.median_interval(), (0.0, np.nan))


def test_kaplan_meier_median_lower_limit_is_where_censoring_leaves_three_at_risk():
    curve = kaplan_meier(*THREE_PRUNED_THREE_FOLLOWED)
    # Six at risk keep the band's upper end at 0.39 until step 1700; after it three are left.
    assert curve.median_interval()[0] == 1701.0


def test_kaplan_meier_greenwood_variance_and_bands_match_a_worked_example():
    # Converged at 1, 2, 3, 5; censored at 2 (after the tied convergence) and 4.
    curve = kaplan_meier(np.array([1, 2, 2, 3, 4, 5]), np.array([1, 1, 0, 1, 0, 1], bool))
    # Survivors 5/6, 2/3, 4/9, 0; Greenwood: S² Σ d / (n (n − d)) = 1/36, 1/27, 4/81.
    np.testing.assert_allclose(curve.fraction, [1 / 6, 1 / 3, 5 / 9, 1.0], rtol=1e-15)
    np.testing.assert_allclose(curve.variance[:3], [25 / 36 / 30, 1 / 27, 4 / 81], rtol=1e-14)
    # Effective sizes S (1 − S) / variance: 6, 6, 5; at 0 survivors n / S before = 1 / (4/9).
    np.testing.assert_allclose(curve.effective, [6, 6, 5, 9 / 4], rtol=1e-14)
    # Wilson's interval at those sizes: 1/6 of 6 is [0.0301, 0.5635].
    assert (round(curve.low[0], 4), round(curve.high[0], 4)) == (0.0301, 0.5635)
    assert curve.low[-1] == pytest.approx(9 / 4 / (9 / 4 + Z2)) and curve.high[-1] == 1.0
    # The band's upper end first reaches ½ at step 1 (0.5635); its lower end never does (0.37
    # at step 5, where 2.25 trials' worth converged): no upper limit.
    assert curve.low[-1] < 0.5
    np.testing.assert_array_equal(curve.median_interval(), (1.0, np.nan))


@pytest.mark.parametrize("k, n", [(0, 1), (0, 7), (1, 6), (3, 6), (8, 10), (10, 10), (17, 40)])
def test_wilson_interval_matches_scipy_binomtest(k, n):
    from scipy.stats import binomtest

    expected = binomtest(k, n).proportion_ci(0.95, method="wilson")
    # Same formula, an independent implementation: equal to rounding.
    np.testing.assert_allclose(wilson_interval(k / n, n), (expected.low, expected.high), atol=1e-12)


def test_kaplan_meier_matches_scipy_ecdf_on_censored_samples_with_ties():
    from scipy.stats import CensoredData, ecdf

    rng = np.random.default_rng(23)
    for _ in range(200):
        trials = int(rng.integers(1, 40))
        steps = rng.integers(0, 12, trials)  # few distinct steps: many ties
        converged = rng.random(trials) < rng.random()
        curve = kaplan_meier(steps, converged)
        reference = ecdf(CensoredData(uncensored=steps[converged], right=steps[~converged]))
        at_events = np.isin(reference.cdf.quantiles, curve.steps)
        # The curve: SciPy's Kaplan–Meier fraction at every step where a trial converged.
        np.testing.assert_array_equal(reference.cdf.quantiles[at_events], curve.steps)
        np.testing.assert_allclose(curve.fraction, reference.cdf.probabilities[at_events],
                                   rtol=0, atol=1e-12)  # fmt: skip
        # Greenwood's variance: SciPy's linear interval is fraction ± z √variance.
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            band = reference.cdf.confidence_interval(0.95, method="linear")
        half = (band.high.probabilities - band.low.probabilities)[at_events] / 2
        inside = (band.low.probabilities[at_events] > 0) & (band.high.probabilities[at_events] < 1)
        np.testing.assert_allclose(
            curve.variance[inside], (half[inside] / 1.959963984540054) ** 2, rtol=1e-9, atol=1e-15
        )
        # Wilson's band at the effective size, and the median's interval read off it.
        low, high, median = _reference_band(steps, converged, reference)
        np.testing.assert_allclose(curve.low, low, rtol=0, atol=1e-12)
        np.testing.assert_allclose(curve.high, high, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(curve.median_interval(), median)


def _reference_band(steps, converged, reference):
    """The 95 % band and the median's interval, from SciPy's curve and counts made here:
    Wilson's interval at Greenwood's effective sample size (n / S before it at 0 survivors);
    the median's ends where the band's ends reach ½, before the first convergence at the
    trials at risk."""
    times = reference.cdf.quantiles
    at_risk = np.array([(steps >= t).sum() for t in times])
    events = np.array([((steps == t) & converged).sum() for t in times])
    survivors = reference.sf.probabilities
    before = np.concatenate([[1.0], survivors[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        variance = survivors**2 * np.cumsum(events / (at_risk * (at_risk - events)))
        effective = np.where(
            survivors > 0, survivors * (1 - survivors) / variance, at_risk / before
        )
    fraction = 1 - survivors

    def wilson(p, n):
        centre = (p + Z2 / (2 * n)) / (1 + Z2 / n)
        half = np.sqrt(Z2 * p * (1 - p) / n + Z2 * Z2 / (4 * n * n)) / (1 + Z2 / n)
        return np.clip(centre - half, 0, p), np.clip(centre + half, p, 1)

    keep = events > 0
    low, high = wilson(fraction[keep], effective[keep])
    first = times[keep][0] if keep.any() else np.inf
    # Before the first convergence the band is [0, z² / (n + z²)] with n the trials at risk.
    starts = np.concatenate([[0], np.unique(steps[~converged]) + 1])
    early = [t for t in starts if t < first and (steps >= t).sum() <= Z2]
    reached = times[keep][high >= 0.5 - 1e-9]
    median_low = early[0] if early else (reached[0] if reached.size else np.nan)
    settled = times[keep][low >= 0.5 - 1e-9]
    median_high = settled[0] if settled.size else np.nan
    return low, high, (float(median_low), float(median_high))


def test_fastest_group_needs_a_majority_of_its_trials_converged(tmp_path):
    # Echo 1: one lucky trial of four at step 10; echo 3: three of four, around step 60.
    rows = [("complete", 1, 0.01, 10, 200)] + [("complete", 1, 0.6, None, 200)] * 3
    rows += [("complete", 3, 0.01, s, 200) for s in (50, 60, 70)]
    rows += [("complete", 3, 0.6, None, 200)]
    summary = summarize(study_config(tmp_path), _hand_made_trials(rows))
    assert [f.row["echo_step"] for f in summary.fastest] == [3]
    assert summary.fastest[0].candidates == 1
    assert "Fastest group, among the 1 where a majority converged" in " ".join(summary.findings)


def test_fastest_group_is_none_when_no_group_has_a_majority(tmp_path):
    rows = [("complete", 1, 0.01, 10, 200)] + [("complete", 1, 0.6, None, 200)] * 3
    rows += [("complete", 3, 0.6, None, 200)] * 2
    summary = summarize(study_config(tmp_path), _hand_made_trials(rows))
    assert summary.fastest == ()
    assert "No group had a majority of its trials converged" in " ".join(summary.findings)


def test_fastest_group_decides_a_majority_by_the_kaplan_meier_estimate(tmp_path):
    # Echo 1: 2 of 4 converged at 40 and 45, the other 2 pruned at step 20 before they could;
    # echo 3: 3 of 4 converged, at 60 to 80.
    rows = [("complete", 1, 0.01, s, 200) for s in (40, 45)] + [("pruned", 1, 0.5, None, 21)] * 2
    rows += [("complete", 3, 0.01, s, 200) for s in (60, 70, 80)]
    rows += [("complete", 3, 0.6, None, 200)]
    summary = summarize(study_config(tmp_path), _hand_made_trials(rows))
    # The table shows 100 % converged (Kaplan–Meier) at echo 1: a majority, so a candidate.
    assert summary.table["converged_fraction"].tolist() == [1.0, 0.75]
    assert [(f.row["echo_step"], f.candidates) for f in summary.fastest] == [(1, 2)]


def test_fastest_group_is_chosen_within_each_truncation(tmp_path):
    config = study_config(tmp_path, search={"task.echo_step": [2, 3], "task.truncation": [5, 10]})
    # A step at truncation 5 covers 5 time steps, at 10 ten: steps compare within a truncation,
    # where echo 3 is the faster at 5 and echo 2 at 10.
    rows = [("complete", 2, 0.01, 50 + k, 200, 5) for k in range(4)]
    rows += [("complete", 3, 0.01, 30 + k, 200, 5) for k in range(4)]
    rows += [("complete", 2, 0.01, 60 + k, 100, 10) for k in range(4)]
    rows += [("complete", 3, 0.01, 90 + k, 100, 10) for k in range(4)]
    trials = _hand_made_trials([row[:5] for row in rows], truncation=[row[5] for row in rows])
    summary = summarize(config, trials)
    # One fastest group per truncation, each among that truncation's groups alone.
    assert [(f.truncation, f.row["truncation"], f.row["echo_step"]) for f in summary.fastest] == [
        (5, 5, 3),
        (10, 10, 2),
    ]
    text = " ".join(summary.findings)
    assert "At truncation 5, fastest group, among the 2" in text
    assert "At truncation 10, fastest group, among the 2" in text


def _pruned_trials() -> pd.DataFrame:
    """Echo 1: 2 converged at 40 and 45, 3 pruned at step 20; echo 3: 3 of 4 converged, none
    pruned."""
    rows = [("complete", 1, 0.01, s, 200) for s in (40, 45)] + [("pruned", 1, 0.5, None, 21)] * 3
    rows += [("complete", 3, 0.01, s, 200) for s in (60, 70, 80)]
    rows += [("complete", 3, 0.6, None, 200)]
    return _hand_made_trials(rows)


def test_summarize_reports_the_fraction_with_pruned_trials_counted_as_never_converging(tmp_path):
    table = summarize(study_config(tmp_path), _pruned_trials()).table
    echo1, echo3 = table.iloc[0], table.iloc[1]
    # Pruned trials censored (Kaplan–Meier): 2 of the 2 followed; counted as failures: 2 of 5.
    assert echo1["converged_fraction"] == 1.0
    assert echo1["converged_fraction_pruned_never"] == pytest.approx(0.4)
    low, high = wilson_interval(0.4, 5)
    assert (
        echo1["converged_fraction_pruned_never_low"],
        echo1["converged_fraction_pruned_never_high"],
    ) == (
        pytest.approx(low),
        pytest.approx(high),
    )
    # With nothing pruned the two bounds are one.
    assert echo3["converged_fraction_pruned_never"] == echo3["converged_fraction"] == 0.75


def test_findings_say_where_pruning_decides_whether_a_majority_converged(tmp_path):
    summary = summarize(study_config(tmp_path), _pruned_trials())
    bias = next(s for s in summary.findings if s.startswith("Pruning"))
    # Echo 1: a majority by Kaplan–Meier (100 %), not with the pruned counted as failures (40 %).
    assert "1 of the 1 groups with pruned trials" in bias
    assert "echo step 1 (100% against 40%)" in bias


def test_render_markdown_shows_both_bounds_and_why_when_trials_were_pruned(tmp_path):
    markdown = render_markdown(summarize(study_config(tmp_path), _pruned_trials()))
    # The reader learns why there are two: a pruner stops the trials that looked bad.
    assert "A pruner stops trials because they looked bad" in markdown
    assert "pruned as never converged" in markdown and "| 40% (" in markdown


def _depth_trials(deep_steps: list[int], shallow_steps: list[int], echo: int = 3) -> list:
    return [("complete", echo, 0.01, s, 200, 1) for s in shallow_steps] + [
        ("complete", echo, 0.01, s, 200, 3) for s in deep_steps
    ]


def _with_layers(rows: list) -> pd.DataFrame:
    trials = _hand_made_trials([row[:5] for row in rows])
    return trials.assign(num_layers=[row[5] for row in rows])


def test_depth_finding_claims_a_trend_only_where_the_intervals_are_apart(tmp_path):
    # Echo 1: eight trials per depth, 3 layers clearly slower; echo 3: the two depths mixed.
    rows = _depth_trials([150 + k for k in range(8)], [20 + k for k in range(8)], echo=1)
    rows += _depth_trials([40, 60, 80, 100], [50, 70, 90, 110], echo=3)
    summary = summarize(study_config(tmp_path), _with_layers(rows))
    verdicts = {c.stratum["echo_step"]: c.verdict for c in summary.comparisons}
    assert verdicts == {1: "more", 3: "unclear"}
    depth = next(s for s in summary.findings if s.startswith("Depth"))
    assert "3 layers took more steps than 1 layer at echo step 1" in depth
    assert "no clear difference at echo step 3" in depth


def test_depth_is_compared_within_each_echo_step_not_pooled_over_them(tmp_path):
    # Pooled, 3 layers look slower only because they ran the harder echo step; within each
    # echo step the depths are the same.
    rows = _depth_trials([], [20 + k for k in range(8)], echo=1)
    rows += _depth_trials([150 + k for k in range(8)], [], echo=9)
    rows += _depth_trials([30, 31, 32, 33], [30, 31, 32, 33], echo=3)
    summary = summarize(study_config(tmp_path), _with_layers(rows))
    assert [(c.stratum, c.verdict) for c in summary.comparisons] == [({"echo_step": 3}, "unclear")]


def test_summarize_knows_truncation_as_a_factor_when_it_is_searched(tmp_path):
    config = study_config(tmp_path, search={"task.echo_step": [2, 6], "task.truncation": [5, 10]})
    # At truncation 5, echo 6 is beyond reach; at 10 it is learned, more slowly than echo 2.
    rows = [("complete", 2, 0.01, 30 + k, 200, 5) for k in range(4)]
    rows += [("complete", 6, 0.69, None, 200, 5)] * 4
    rows += [("complete", 2, 0.01, 20 + k, 100, 10) for k in range(4)]
    rows += [("complete", 6, 0.01, 80 + k, 100, 10) for k in range(4)]
    trials = _hand_made_trials([row[:5] for row in rows], truncation=[row[5] for row in rows])
    summary = summarize(config, trials)
    assert "truncation" in summary.table.columns and len(summary.table) == 4
    assert set(summary.by_factor["factor"]) == {
        "num_layers",
        "state_size",
        "echo_step",
        "truncation",
    }
    assert summary.frontier[["truncation", "echo_step"]].values.tolist() == [
        [5, 2], [5, 6], [10, 2], [10, 6]
    ]  # fmt: skip
    assert "plots/truncation_frontier.png" in summary.plots
    text = " ".join(summary.findings)
    assert "Learning stops at the truncation: none of the 4 trials" in text
    assert "6 at truncation 10" in text and "2 at truncation 5" in text
    slow = {s.truncation: s.verdict for s in summary.slowdowns}
    assert slow == {5: "unclear", 10: "more"}


def test_write_summary_of_a_study_has_one_row_per_group_with_its_counts(study, summary):
    table = pd.read_parquet(f"{study.output}/summary.parquet")
    keys = ["num_layers", "state_size", "echo_step"]
    assert [tuple(row) for row in table[keys].to_numpy()] == [
        (1, 3, 1),
        (1, 3, 20),
        (1, 4, 1),
        (1, 4, 20),
    ]
    assert (table["trials"] == 2).all() and (table["complete"] == 2).all()
    trials = pd.read_parquet(f"{study.output}/trials.parquet")
    converged = trials.groupby(keys)["converged"].sum().to_numpy()
    assert table["converged"].tolist() == converged.tolist()
    by_factor = pd.read_parquet(f"{study.output}/summary_by_factor.parquet")
    assert by_factor.groupby("factor")["trials"].sum().to_dict() == dict.fromkeys(keys, 8)
    # Without a pruner the fraction with pruned trials counted as failures is Kaplan–Meier's.
    assert table["converged_fraction_pruned_never"].tolist() == table["converged_fraction"].tolist()


def test_write_summary_finds_the_echo_step_beyond_the_truncation_never_converged(summary):
    assert summary.never_converged_echo_steps == (20,)
    assert summary.unreachable_echo_steps == (20,)
    echo = next(s for s in summary.findings if "never converged" in s)
    assert "Echo step 20" in echo and "truncation length (15)" in echo
    # Echo step 1 is learned, and the summary says how many of its trials got there.
    learned = summary.table[summary.table["echo_step"] == 1]
    assert learned["converged"].sum() >= 3
    assert f"Echo step 1 converged in {learned['converged'].sum()} of 4" in " ".join(
        summary.findings
    )


def test_write_summary_markdown_says_what_ran_and_holds_the_findings(study, summary):
    markdown = Path(study.output, "summary.md").read_text()
    assert "Study `test-study`: grid sampler, no pruner" in markdown
    assert "`task.echo_step`: 1, 20" in markdown and "`task.truncation` = 15" in markdown
    assert "Trials by state: 8 COMPLETE, 0 PRUNED, 0 FAIL." in markdown
    assert all(sentence in markdown for sentence in summary.findings)
    assert markdown.count("\n| 1 | 3 | 1 | 2 |") == 1


def test_write_summary_plots_are_readable_pngs(study, summary):
    # Its state sizes (3, 4) and echo steps (1, 20) vary: the capacity frontier is drawn too.
    assert summary.files[-5:] == summary.plots and len(summary.plots) == 5
    assert "plots/capacity_frontier.png" in summary.plots
    for name in summary.plots:
        path = f"{study.output}/{name}"
        with open(path, "rb") as file:
            assert file.read(8) == PNG_SIGNATURE
        with Image.open(path) as image:
            image.load()
            assert image.width >= 400 and image.height >= 250


def _forget_trial(output: Path, trial: int) -> None:
    """Rewrite the steps files without `trial`: its rows and its row in their footers."""
    for path in (output / "steps").glob("*.parquet"):
        table = pq.read_table(path)
        rows = json.loads(table.schema.metadata[TRIALS_METADATA_KEY])
        kept = [row for row in rows if row["trial"] != trial]
        table = table.filter(pc.field("trial") != trial)
        pq.write_table(table.replace_schema_metadata({TRIALS_METADATA_KEY: json.dumps(kept)}), path)


def test_write_summary_counts_trials_whose_steps_are_newer_than_trials_parquet(study, tmp_path):
    # An interrupted study: trials.parquet was last written when only two trials had finished.
    output = tmp_path / "interrupted"
    shutil.copytree(study.output, output)
    trials = pq.read_table(output / "trials.parquet")
    pq.write_table(trials.slice(0, 2), output / "trials.parquet")
    _forget_trial(output, 7)  # and trial 7 never finished
    summary = write_summary(str(output))
    assert summary.table["trials"].sum() == 7
    assert summary.findings[0].startswith("Only 7 of the study's 8 trials have finished")


def test_load_steps_filters_return_exactly_the_matching_rows(study):
    every = pd.read_parquet(f"{study.output}/steps")
    wanted = every[(every["echo_step"] == 20) & every["state_size"].isin([3])]
    wanted = wanted.sort_values(["trial", "step"], ignore_index=True)
    loaded = load_steps(study.output, echo_step=20, state_size=[3])
    assert len(loaded) == 2 * 200
    pd.testing.assert_frame_equal(loaded, wanted)


def test_load_steps_selects_columns_and_filters_on_others(study):
    loaded = load_steps(study.output, columns=["trial", "loss"], seed=[1], echo_step=[1, 20])
    assert list(loaded.columns) == ["trial", "loss"] and len(loaded) == 4 * 200


def test_load_steps_unknown_column_raises_a_value_error_naming_it(study):
    with pytest.raises(ValueError, match="no column 'layers' in steps; columns: trial, epoch"):
        load_steps(study.output, layers=2)


def test_cli_summarize_a_train_output_writes_one_group(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "run"
    assert main(["train", str(config), "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["summarize", str(out)]) == 0
    printed = capsys.readouterr().out
    # 40 steps are fewer than the 100-step convergence window.
    assert "A single `train` run (trial 0), COMPLETE: it never converged" in printed
    assert f"Summary in {out}/" in printed
    table = pd.read_parquet(out / "summary.parquet")
    assert table[["num_layers", "state_size", "echo_step", "trials"]].values.tolist() == [
        [2, 4, 3, 1]
    ]
    assert all((out / name).read_bytes()[:8] == PNG_SIGNATURE for name in PLOTS_OF_A_RUN)


BAD_OUTPUTS = {
    "missing folder": (None, "no such folder"),
    "not an echo-study folder": ({"beach.jpg": "..."}, "not an echo-study output"),
    "no finished trial": ({"config.yaml": yaml.safe_dump(SMALL)}, "no finished trials yet"),
    "broken config": ({"config.yaml": "task: [1, 2"}, "config.yaml: unreadable"),
}


@pytest.mark.parametrize("files, message", BAD_OUTPUTS.values(), ids=BAD_OUTPUTS.keys())
def test_cli_summarize_rejects_a_bad_folder_in_one_line_writing_nothing(
    tmp_path, capsys, files, message
):
    out = tmp_path / "out"
    if files is not None:
        out.mkdir()
        for name, text in files.items():
            (out / name).write_text(text)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["summarize", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_loss_curves_are_pandas_rolling_means_and_quantiles_of_ragged_trials():
    # Trials of different lengths, with NaN and inf losses, one with none finite, one not
    # trained, their rows shuffled: the curves are what pandas' rolling mean and quantile per
    # group and step give.
    rng = np.random.default_rng(0)
    steps, trials = [], []
    for number in range(30):
        loss = rng.random(int(rng.integers(1, 250))).astype(np.float32)
        loss[-1] = np.nan if number % 5 == 0 else loss[-1]
        loss[rng.integers(0, len(loss), 3)] = np.inf if number % 7 == 0 else loss[0]
        loss[:] = np.nan if number == 11 else loss
        steps.append(pd.DataFrame({"trial": number, "step": np.arange(len(loss)), "loss": loss}))
        trials.append({"trial": number, "num_layers": 1 + number % 2, "state_size": 4,
                       "echo_step": 1 + number % 3, "trained": number != 13})  # fmt: skip
    steps, trials = pd.concat(steps, ignore_index=True), pd.DataFrame(trials)
    keys = ["num_layers", "state_size", "echo_step"]

    def by_pandas(window: int) -> pd.DataFrame:
        rows = steps.merge(trials[trials["trained"]], on="trial")
        loss = rows["loss"].astype(float).where(np.isfinite(rows["loss"]))
        rows["smooth"] = loss.groupby(rows["trial"]).transform(
            lambda x: x.rolling(window, min_periods=1).mean()
        )
        wide = rows.pivot_table(index=[*keys, "step"], columns="trial", values="smooth",
                                dropna=False)  # fmt: skip
        present = rows.groupby([*keys, "step"]).size().index
        wide = wide.loc[present]
        return pd.DataFrame(
            {
                "q25": wide.quantile(0.25, axis=1),
                "median": wide.quantile(0.5, axis=1),
                "q75": wide.quantile(0.75, axis=1),
                "trials": wide.notna().sum(axis=1),
            }
        ).reset_index()

    for window in (1, 4, 100):
        shuffled = steps.sample(frac=1.0, random_state=window)  # rows in any order
        got, want = loss_curves(shuffled, trials, window), by_pandas(window)
        assert list(got.columns) == [*keys, "step", "q25", "median", "q75", "trials"]
        assert len(got) == len(want) and got["trials"].sum() > 0
        for column in got.columns:
            expected = want[column].to_numpy(float)
            np.testing.assert_allclose(got[column].to_numpy(float), expected, rtol=1e-12)


def _capacity_trials() -> pd.DataFrame:
    """6 seeds per group. Converged of 6 by echo step 1, 2, 3, 4: 1 layer × 1 unit 6, 0, 0, 0;
    1 × 4: 6, 6, 6, 0; 2 × 1: 6, 6, 2, 0; 2 × 4: 6, 6, 6, 6."""
    learned = {(1, 1): [6, 0, 0, 0], (1, 4): [6, 6, 6, 0], (2, 1): [6, 6, 2, 0], (2, 4): [6] * 4}
    rows, layers, sizes = [], [], []
    for (depth, size), counts in learned.items():
        for echo, count in enumerate(counts, start=1):
            for seed in range(6):
                rows.append(("complete", echo, 0.01, 50 + seed, 200) if seed < count else
                            ("complete", echo, 0.6, None, 200))  # fmt: skip
                layers.append(depth)
                sizes.append(size)
    return _hand_made_trials(rows).assign(num_layers=layers, state_size=sizes)


def test_capacity_table_holds_the_largest_echo_step_a_majority_learned(tmp_path):
    capacity = summarize(study_config(tmp_path), _capacity_trials()).capacity
    keys = ["num_layers", "state_size", "largest_echo_step", "next_echo_step"]
    # 2 of 6 at echo 3 is no majority, so 2 × 1 reaches 2; 2 × 4 learned every echo step run.
    np.testing.assert_array_equal(
        capacity[keys].to_numpy(float),
        [[1, 1, 1, 2], [1, 4, 3, 4], [2, 1, 2, 3], [2, 4, 4, np.nan]],
    )
    # The fractions there and at the next step are the group table's, with their intervals.
    row = capacity.iloc[2]
    assert row["converged_fraction"] == 1.0 and row["next_converged_fraction"] == pytest.approx(
        1 / 3
    )
    low, high = wilson_interval(1 / 3, 6)
    assert (row["next_converged_fraction_low"], row["next_converged_fraction_high"]) == (
        pytest.approx(low),
        pytest.approx(high),
    )


def test_capacity_finding_says_how_the_frontier_grows_with_state_size_and_depth(tmp_path):
    summary = summarize(study_config(tmp_path), _capacity_trials())
    finding = next(s for s in summary.findings if s.startswith("Capacity frontier"))
    assert "1 layer: 1 at 1, 3 at 4 units; 2 layers: 2 at 1, 4 at 4 units" in finding
    # 0 of 6 past 1 × 1's frontier (interval below ½) against 6 of 6 at 1 × 4's (above): clear;
    # 2 of 6 past 2 × 1's frontier is an interval across ½: not clear.
    assert (
        "1 layer from 1 at 1 to 3 at 4 units: 1 of 1 steps up in state size reach further "
        "(1 clearly)" in finding
    )
    assert (
        "2 layers from 2 at 1 to 4 at 4 units: 1 of 1 steps up in state size reach further "
        "(0 clearly)" in finding
    )
    assert "2 layers against 1 layer: further at 1 and 4 units (1 and 4 units clearly)" in finding
    # 2 × 4 learned echo 4, the largest run: the frontier there is the grid's, not its own.
    assert "2 layers × 4 units learned every echo step run" in finding


def test_capacity_finding_names_the_truncation_where_a_network_learned_every_echo_below_it():
    from pipeline.summary.capacity import capacity_finding

    # 2 × 8 learned echo 14, the last below truncation 15: no grid could show it learn more.
    capacity = pd.DataFrame(
        {"num_layers": [2, 2], "state_size": [4, 8], "largest_echo_step": [8, 14],
         "converged_fraction": [1.0, 1.0], "converged_fraction_low": [0.61, 0.61],
         "converged_fraction_high": [1.0, 1.0], "next_echo_step": [9, np.nan],
         "next_converged_fraction": [0.0, np.nan], "next_converged_fraction_low": [0.0, np.nan],
         "next_converged_fraction_high": [0.39, np.nan]}
    )  # fmt: skip
    at_truncation = capacity_finding(capacity, epochs=40, truncation=15)
    assert (
        "2 layers × 8 units learned every echo step below the truncation (15), the most "
        "truncated BPTT can learn, so the truncation, not the network, stops the frontier there"
        in at_truncation
    )
    # At truncation 20 the grid (up to 14) stopped it, not the truncation.
    assert "learned every echo step run, so the grid" in capacity_finding(capacity, 40, 20)


def test_capacity_is_left_out_when_the_study_varies_no_state_size(tmp_path):
    trials = _capacity_trials()
    summary = summarize(study_config(tmp_path), trials[trials["state_size"] == 4])
    # One state size: no frontier to draw over it.
    assert summary.capacity is None and "plots/capacity_frontier.png" not in summary.plots
    assert not any(s.startswith("Capacity frontier") for s in summary.findings)


def test_capacity_frontier_figure_draws_a_line_per_depth_and_the_truncation(tmp_path):
    from pipeline.summary.plots import capacity_frontier_figure, png_bytes

    capacity = summarize(study_config(tmp_path), _capacity_trials()).capacity
    figure = capacity_frontier_figure(capacity, truncation=15, title="t")
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    # Echo step reached against state size, one line per depth; the truncation at 15.
    assert lines["1 layer"].get_xdata().tolist() == [1, 4]
    assert lines["1 layer"].get_ydata().tolist() == [1, 3]
    assert lines["2 layers"].get_ydata().tolist() == [2, 4]
    assert list(lines["truncation (15)"].get_ydata()) == [15, 15]
    assert png_bytes(figure)[:8] == PNG_SIGNATURE


def test_width_finding_claims_fewer_steps_only_where_the_intervals_are_apart(tmp_path):
    # Echo 1: eight trials per width, 8 units clearly faster than 4; echo 3: the widths mixed.
    def rows(wide: list[int], narrow: list[int], echo: int) -> list:
        return [("complete", echo, 0.01, s, 200, 4) for s in narrow] + [
            ("complete", echo, 0.01, s, 200, 8) for s in wide
        ]

    made = rows([20 + k for k in range(8)], [150 + k for k in range(8)], echo=1)
    made += rows([40, 60, 80, 100], [50, 70, 90, 110], echo=3)
    trials = _hand_made_trials([row[:5] for row in made]).assign(
        state_size=[row[5] for row in made]
    )
    summary = summarize(study_config(tmp_path), trials)
    verdicts = {c.stratum["echo_step"]: c.verdict for c in summary.comparisons}
    # Width is compared within each echo step; a direction only where the intervals are apart.
    assert verdicts == {1: "fewer", 3: "unclear"}
    width = next(s for s in summary.findings if s.startswith("Width"))
    assert "8 units took fewer steps than 4 units at echo step 1" in width
    assert "no clear difference at echo step 3" in width


def test_summary_leaves_out_the_steps_to_converge_heat_map_when_truncation_varies(tmp_path):
    config = study_config(tmp_path, search={"task.echo_step": [2], "task.truncation": [5, 10]})
    rows = [("complete", 2, 0.01, 30 + k, 200) for k in range(4)]
    trials = _hand_made_trials(rows, truncation=[5, 5, 10, 10])
    plots = summarize(config, trials).plots
    # A heat map over layers × state size would mix truncations: it is left out.
    assert "plots/steps_to_converge.png" not in plots
    assert "plots/truncation_frontier.png" in plots
