"""Convergence metrics and the study summary, on real Parquet files and a real small study."""

import json
import shutil
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


def test_fastest_group_needs_a_majority_of_its_trials_converged(tmp_path):
    # Echo 1: one lucky trial of four at step 10; echo 3: three of four, around step 60.
    rows = [("complete", 1, 0.01, 10, 200)] + [("complete", 1, 0.6, None, 200)] * 3
    rows += [("complete", 3, 0.01, s, 200) for s in (50, 60, 70)]
    rows += [("complete", 3, 0.6, None, 200)]
    summary = summarize(study_config(tmp_path), _hand_made_trials(rows))
    assert summary.fastest.row["echo_step"] == 3
    assert summary.fastest.candidates == 1
    assert "Fastest group, among the 1 where a majority converged" in " ".join(summary.findings)


def test_fastest_group_is_none_when_no_group_has_a_majority(tmp_path):
    rows = [("complete", 1, 0.01, 10, 200)] + [("complete", 1, 0.6, None, 200)] * 3
    rows += [("complete", 3, 0.6, None, 200)] * 2
    summary = summarize(study_config(tmp_path), _hand_made_trials(rows))
    assert summary.fastest is None
    assert "No group had a majority of its trials converged" in " ".join(summary.findings)


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
    assert summary.files[-4:] == summary.plots and len(summary.plots) == 4
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
