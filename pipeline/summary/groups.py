"""Convergence: per-trial metrics from the per-step losses, and the numbers of the study's summary.

The summary groups a study's finished trials by its factors (num_layers, state_size,
echo_step, and truncation when the study searches it), pooling whatever else varies (seeds,
learning rates), and writes into the output folder:

    summary.parquet            one row per group
    summary_by_factor.parquet  the same statistics over each factor alone: `factor` names it,
                               `value` is its value
    summary.md                 what was run, the findings in sentences, the tables (words.py)
    plots/*.png                see PLOTS

This module computes the numbers; words.py words them.

Which trials count: every finished trial is in `trials` and in the counts by state. A trial
that trained to an outcome (status complete, pruned or diverged) is in `trained`; a trial that
raised an error or lost its worker says nothing about convergence and is left out.

Time to converge is censored data, so the statistics are survival statistics. A trained trial
either converged at its `steps_to_converge` (an event) or is censored: a complete trial that
never converged at its last step, a pruned one at the step where it was stopped (it might have
converged later), a diverged one at the end of the planned run (its fate is known: it never
converges, so it stays among the trials at risk to the end). A diverged trial never counts as
converged, even if its moving average had dipped below the threshold first. From these:

- the fraction converged by step s is the Kaplan–Meier estimate (with every trial followed to
  the end it is the plain fraction converged/trained; a pruned trial counts until it stopped);
- `converged_fraction` is that estimate at the group's last step, with a 95 % Wilson interval
  (for a Kaplan–Meier estimate, Wilson's interval at the effective sample size that Greenwood's
  variance implies, which is the number of trials when none was censored early; where the
  last trials followed all converged, its limit, and with none converged, the trials followed
  to the end: a pruned trial adds no certainty);
- `converged_fraction_pruned_never` (and its interval) is the same estimate with every pruned
  trial that had not converged counted as never converging, followed to the planned end. A
  pruner stops trials because they looked bad, so the Kaplan–Meier fraction, which lets a
  pruned trial converge as often as those followed on, is an upper estimate, and this one a
  lower estimate; without pruned trials the two are one;
- `median_steps_to_converge` (and the quartiles) are the steps at which that fraction reaches
  one half (a quarter, three quarters): null when it never does, which reads "more than
  `horizon_step` steps". Its 95 % interval comes from the same pointwise band (see
  `Survival.median_interval`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.config import Config
from pipeline.summary.capacity import ARCHITECTURE, capacity_table, varies_capacity
from pipeline.summary.survival import TOLERANCE, Survival, kaplan_meier, median_bounds

GROUP = ["num_layers", "state_size", "echo_step"]
# A factor the summary knows only when the study searches it.
TRUNCATION = "truncation"
# Statistics of a set of trials, in the order of the Parquet columns.
STATISTICS = {
    "trials": pa.int32(),
    "complete": pa.int32(),
    "pruned": pa.int32(),
    "failed": pa.int32(),
    "diverged": pa.int32(),
    "trained": pa.int32(),
    "converged": pa.int32(),
    "converged_fraction": pa.float64(),
    "converged_fraction_low": pa.float64(),
    "converged_fraction_high": pa.float64(),
    "converged_fraction_pruned_never": pa.float64(),
    "converged_fraction_pruned_never_low": pa.float64(),
    "converged_fraction_pruned_never_high": pa.float64(),
    "median_steps_to_converge": pa.float64(),
    "median_steps_to_converge_low": pa.float64(),
    "median_steps_to_converge_high": pa.float64(),
    "steps_to_converge_q25": pa.float64(),
    "steps_to_converge_q75": pa.float64(),
    "horizon_step": pa.int32(),
    "median_final_loss": pa.float64(),
}


@dataclass(frozen=True)
class Comparison:
    """A factor's smallest and largest levels compared within one stratum: one echo step (and
    one truncation when it varies), pooled over everything else."""

    factor: str
    stratum: dict[str, int]
    levels: pd.DataFrame
    """group_table rows of the stratum's trials by the factor, ascending."""
    verdict: str
    """"more" (the largest level took more steps, the 95 % intervals of the medians apart),
    "fewer", "unclear" (they overlap), or "none converged" (neither extreme reached half)."""


@dataclass(frozen=True)
class Fastest:
    """The group with the fewest median steps to converge among those where most converged,
    within one truncation (a step at truncation T covers T time steps)."""

    truncation: int | None
    """The truncation compared within when the study searches it, else None."""
    row: pd.Series
    overlapping: int
    """Other such groups whose median interval overlaps this one's: not clearly slower."""
    candidates: int
    """Groups where a majority converged (Kaplan–Meier, as the table shows)."""


@dataclass(frozen=True)
class Slowdown:
    """At one truncation, the smallest echo step against the largest one where most trials
    converged: how much longer convergence took as the echo step neared the truncation."""

    truncation: int
    first: pd.Series
    """The frontier row of the smallest echo step."""
    last: pd.Series
    """The frontier row of the largest echo step below the truncation where a majority
    converged; the same row when there is only one."""
    stalled: tuple[int, ...]
    """Echo steps below the truncation where fewer than half converged."""
    verdict: str
    """"more" when the 95 % intervals of the two medians are apart, else "unclear"."""


@dataclass(frozen=True)
class Summary:
    """What `write_summary` computed and wrote."""

    config: Config
    factors: tuple[str, ...]
    """The factors the trials are grouped by: GROUP, and truncation when searched."""
    trials: pd.DataFrame
    """One row per finished trial, as in trials.parquet, plus the columns of the counting
    rule: `diverged`, `trained`, `reached` (converged), `event_step` (where it converged or
    was censored), `last_step` (the last step it ran, or for a diverged trial was to run) and
    `reachable` (echo step below its truncation)."""
    table: pd.DataFrame
    """summary.parquet: one row per group of `factors`."""
    by_factor: pd.DataFrame
    """summary_by_factor.parquet: one row per value of each factor alone."""
    never_converged_echo_steps: tuple[int, ...]
    """Echo steps with trained trials of which none converged."""
    unreachable_echo_steps: tuple[int, ...]
    """Echo steps run that are at or beyond the (fixed) truncation length."""
    comparisons: tuple[Comparison, ...]
    """Depth and width, each compared within every reachable echo step."""
    fastest: tuple[Fastest, ...]
    """One per truncation (one in all when it is fixed)."""
    by_reach: pd.DataFrame
    """Statistics by `reachable` (echo step below its truncation or not)."""
    frontier: pd.DataFrame | None
    """When truncation varies: statistics by (truncation, echo_step), pooled over the rest."""
    slowdowns: tuple[Slowdown, ...]
    """When truncation varies: one per truncation."""
    survival: dict[str, dict[int, Survival]]
    """Fraction converged against step for each level of each factor."""
    capacity: pd.DataFrame | None = None
    """When the study varies state size and echo step: per depth and state size (and
    truncation), the largest echo step where a majority converged (capacity.capacity_table)."""
    findings: tuple[str, ...] = ()
    """The headline findings, in sentences derived from the numbers (words.findings)."""
    files: tuple[str, ...] = ()
    """What was written, relative to the output folder."""

    @property
    def truncation(self) -> int | None:
        """The truncation length of every trial; None when the study searches it."""
        return None if TRUNCATION in self.factors else self.config.task.truncation

    @property
    def is_single_run(self) -> bool:
        # A study always searches something; `train` writes a config with an empty search.
        return not self.config.study.search

    @property
    def plots(self) -> tuple[str, ...]:
        """The plots of this summary: the frontier only when truncation varies; then the heat
        map over layers × state size per echo step would mix truncations, and is left out."""
        names = ["loss_curves", "converged_fraction", "time_to_converge"]
        names.insert(1, "truncation_frontier" if self.truncation is None else "steps_to_converge")
        if self.capacity is not None:
            names.append("capacity_frontier")
        return tuple(PLOTS[name] for name in names)


def summary_numbers(config: Config, trials: pd.DataFrame) -> Summary:
    """The numbers of a study's finished trials (rows as in trials.parquet, with `status`),
    without the findings (write.summarize adds those, in words.py's sentences)."""
    factors = _factors(config)
    trials = _with_counting_rule(config, trials)
    table = group_table(trials, factors)
    by_factor = pd.concat(
        [
            group_table(trials, [factor]).rename(columns={factor: "value"}).assign(factor=factor)
            for factor in factors
        ],
        ignore_index=True,
    )
    by_factor = by_factor[["factor", "value", *STATISTICS]]
    by_echo = by_factor[(by_factor["factor"] == "echo_step") & (by_factor["trained"] > 0)]
    never = tuple(int(e) for e in by_echo.loc[by_echo["converged"] == 0, "value"])
    fixed = TRUNCATION not in factors
    frontier = None if fixed else group_table(trials, [TRUNCATION, "echo_step"])
    unreachable = tuple(int(e) for e in by_echo["value"] if fixed and e >= config.task.truncation)
    return Summary(
        config=config,
        factors=tuple(factors),
        trials=trials,
        table=table,
        by_factor=by_factor,
        never_converged_echo_steps=never,
        unreachable_echo_steps=unreachable,
        comparisons=tuple(
            comparison
            for factor in ("num_layers", "state_size")
            for comparison in compare_within_echo_steps(trials, factor, factors)
        ),
        fastest=tuple(fastest_groups(table)),
        by_reach=group_table(trials, ["reachable"]),
        frontier=frontier,
        slowdowns=() if frontier is None else tuple(slowdowns(frontier)),
        capacity=capacity_table(table, [*ARCHITECTURE, *([] if fixed else [TRUNCATION])])
        if varies_capacity(table)
        else None,
        survival={
            factor: {
                int(level): _survival(group)
                for level, group in trials[trials["trained"]].groupby(factor, sort=True)
            }
            for factor in factors
        },
    )


def group_table(trials: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """The statistics of STATISTICS for the trials of each value of `by` (the rules are in
    the module docstring); `trials` needs the columns that `summarize` adds."""
    rows = [
        {**dict(zip(by, key, strict=True)), **_statistics(group)}
        for key, group in trials.groupby(list(by), sort=True)
    ]
    return pd.DataFrame(rows, columns=[*by, *STATISTICS])


def compare_within_echo_steps(
    trials: pd.DataFrame, factor: str, factors: Sequence[str]
) -> list[Comparison]:
    """`factor`'s smallest and largest levels compared within each echo step below the
    truncation (and each truncation, when it varies), so that a different mix of echo steps
    between levels cannot pass for an effect. A direction is claimed only when the two 95 %
    intervals of the median steps to converge are apart, a conservative test."""
    strata = [f for f in factors if f in ("echo_step", TRUNCATION)]
    trained = trials[trials["trained"] & trials["reachable"]]
    if trained[factor].nunique() < 2:
        return []
    comparisons = []
    for key, group in trained.groupby(strata, sort=True):
        levels = group_table(group, [factor])
        if len(levels) < 2:
            continue
        smallest, largest = levels.iloc[0], levels.iloc[-1]
        comparisons.append(
            Comparison(
                factor=factor,
                stratum={name: int(value) for name, value in zip(strata, key, strict=True)},
                levels=levels,
                verdict=_verdict(smallest, largest),
            )
        )
    return comparisons


def fastest_groups(table: pd.DataFrame) -> list[Fastest]:
    """Within each truncation, the fastest group (see fastest_group); steps at different
    truncations cover different time steps, so they are never ranked together."""
    if TRUNCATION not in table:
        found = fastest_group(table)
        return [found] if found else []
    found = (fastest_group(rows, int(t)) for t, rows in table.groupby(TRUNCATION, sort=True))
    return [fastest for fastest in found if fastest]


def fastest_group(table: pd.DataFrame, truncation: int | None = None) -> Fastest | None:
    """The group with the fewest median steps to converge among those where a majority
    converged (one of four converging fast is luck, not speed), a majority by the Kaplan–Meier
    fraction that the table shows; None when no such group, or only one group, exists."""
    majority = table[converged_by_majority(table)].dropna(subset=["median_steps_to_converge"])
    if majority.empty or len(table) < 2:
        return None
    ranked = majority.sort_values(
        ["median_steps_to_converge", "converged_fraction"], ascending=[True, False]
    )
    best = ranked.iloc[0]
    _, best_high = median_bounds(best)
    overlapping = sum(median_bounds(row)[0] <= best_high for _, row in ranked.iloc[1:].iterrows())
    return Fastest(truncation, best, int(overlapping), len(majority))


def converged_by_majority(rows: pd.DataFrame) -> pd.Series:
    """Where more than half converged, by the Kaplan–Meier fraction (`converged_fraction`):
    the one estimate the tables show, so that a finding never contradicts them."""
    return rows["converged_fraction"] > 0.5 + TOLERANCE


def slowdowns(frontier: pd.DataFrame) -> list[Slowdown]:
    """For each truncation, how convergence slows from the smallest echo step to the largest
    one below the truncation where a majority converged (see Slowdown)."""
    result = []
    for truncation, rows in frontier.groupby(TRUNCATION, sort=True):
        below = rows[(rows["echo_step"] < truncation) & (rows["trained"] > 0)]
        if below.empty:
            continue
        below = below.sort_values("echo_step")
        majority = below[converged_by_majority(below)]
        first = below.iloc[0]
        last = majority.iloc[-1] if len(majority) else first
        stalled = tuple(int(e) for e in below.loc[~converged_by_majority(below), "echo_step"])
        same = last["echo_step"] == first["echo_step"]
        verdict = "unclear" if same else _verdict(first, last)
        result.append(Slowdown(int(truncation), first, last, stalled, verdict))
    return result


def loss_curves(
    steps: pd.DataFrame, trials: pd.DataFrame, window: int, keys: Sequence[str] = tuple(GROUP)
) -> pd.DataFrame:
    """Per group of `keys` and step, the quartiles over the group's trained trials of each
    trial's trailing mean loss over up to `window` steps (non-finite losses left out).

    Columns: `keys`, `step`, `q25`, `median`, `q75`, `trials` (how many reached that step)."""
    keys = list(keys)
    trained = trials.loc[trials["trained"], ["trial", *keys]]
    steps = steps[steps["trial"].isin(trained["trial"])]
    if not steps["trial"].is_monotonic_increasing:  # load_steps sorts them already
        steps = steps.sort_values("trial", kind="stable")
    numbers, starts, counts = np.unique(
        steps["trial"].to_numpy(), return_index=True, return_counts=True
    )
    rows_of = {n: slice(s, s + c) for n, s, c in zip(numbers, starts, counts, strict=True)}
    step, loss = steps["step"].to_numpy(), steps["loss"].to_numpy(np.float64)
    frames = []
    for key, group in trained.groupby(keys, sort=True):
        parts = [rows_of[number] for number in group["trial"] if number in rows_of]
        if not parts:
            continue
        # The group's trials side by side, a row per trial and a column per step, in whole
        # arrays: pandas' rolling mean per trial and a pivot and quantile per group took 0.26
        # s on configs/study.yaml's 1.1 million steps, these 0.08.
        row = np.repeat(np.arange(len(parts)), [part.stop - part.start for part in parts])
        column = np.concatenate([step[part] for part in parts])
        losses = np.full((len(parts), int(column.max()) + 1), np.nan)
        losses[row, column] = np.concatenate([loss[part] for part in parts])
        ran = np.zeros(losses.shape, bool)
        ran[row, column] = True
        smooth = np.where(ran, _trailing_means(losses, window), np.nan)
        reached = ran.any(axis=0)
        values = smooth[:, reached].T  # (steps, trials)
        q25, median, q75 = _quartiles(values)
        frames.append(
            pd.DataFrame(
                {
                    **dict(zip(keys, key, strict=True)),
                    "step": np.flatnonzero(reached).astype(step.dtype),
                    "q25": q25,
                    "median": median,
                    "q75": q75,
                    "trials": np.isfinite(values).sum(axis=1),
                }
            )
        )
    columns = [*keys, "step", "q25", "median", "q75", "trials"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _trailing_means(losses: np.ndarray, window: int) -> np.ndarray:
    """Each row's mean over up to `window` values ending at each column, of the finite ones
    (NaN where none is), as pandas' rolling(window, min_periods=1).mean() gives it."""
    finite = np.isfinite(losses)
    sums = np.cumsum(np.where(finite, losses, 0.0), axis=1)
    counts = np.cumsum(finite, axis=1)
    sums[:, window:] -= sums[:, :-window].copy()
    counts[:, window:] -= counts[:, :-window].copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def _quartiles(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The quartiles of each row's finite values (NaN where none is), interpolated linearly
    between order statistics, as pandas and numpy do by default."""
    ordered = np.sort(values, axis=1)  # NaN last
    counts = np.isfinite(values).sum(axis=1)
    last = np.maximum(counts - 1, 0)
    quartiles = []
    for q in (0.25, 0.5, 0.75):
        position = q * last
        below = np.floor(position).astype(np.int64)
        above = np.minimum(below + 1, last)
        low = np.take_along_axis(ordered, below[:, None], axis=1)[:, 0]
        high = np.take_along_axis(ordered, above[:, None], axis=1)[:, 0]
        quartiles.append(np.where(counts > 0, low + (high - low) * (position - below), np.nan))
    return quartiles[0], quartiles[1], quartiles[2]


def _factors(config: Config) -> list[str]:
    searched = any(p.key == "task.truncation" for p in config.study.search)
    return [*GROUP, *([TRUNCATION] if searched else [])]


def _with_counting_rule(config: Config, trials: pd.DataFrame) -> pd.DataFrame:
    """Add `diverged`, `trained`, `reached`, `event_step` and `reachable`: see the module
    docstring."""
    status = trials["status"]
    diverged = status == "diverged"
    trained = status.isin(["complete", "pruned", "diverged"])
    reached = trained & ~diverged & trials["converged"] & trials["steps_to_converge"].notna()
    planned = _planned_steps(config, trials)
    ran = trials["steps"].astype(float) if "steps" in trials else planned
    last = ran.where(ran.notna() & ~diverged, planned) - 1
    event_step = trials["steps_to_converge"].astype(float).where(reached, last)
    truncation = _column_or(config, trials, TRUNCATION, "task.truncation")
    trials = trials.assign(
        last_step=last,
        planned_last_step=planned - 1,
        diverged=diverged,
        trained=trained,
        reached=reached,
        event_step=event_step,
        reachable=trials["echo_step"] < truncation,
    )
    return trials


def _planned_steps(config: Config, trials: pd.DataFrame) -> pd.Series:
    """Steps each trial was to run: epochs × windows per epoch, from its own parameters."""
    length = _column_or(config, trials, "series_length", "task.series_length")
    batch = _column_or(config, trials, "batch_size", "task.batch_size")
    truncation = _column_or(config, trials, TRUNCATION, "task.truncation")
    epochs = _column_or(config, trials, "epochs", "train.epochs")
    return (epochs * (length // batch // truncation)).astype(float)


def _column_or(config: Config, trials: pd.DataFrame, column: str, key: str) -> pd.Series:
    if column in trials:
        return trials[column].astype("int64")
    return pd.Series(config.value(key), index=trials.index, dtype="int64")


def _survival(trials: pd.DataFrame, pruned_never: bool = False) -> Survival:
    """The Kaplan–Meier curve of the trained trials; with `pruned_never`, a pruned trial that
    had not converged counts as never converging, followed to its planned end."""
    trained = trials[trials["trained"]]
    event_step = trained["event_step"]
    if pruned_never:
        failed = (trained["status"] == "pruned") & ~trained["reached"]
        event_step = event_step.where(~failed, trained["planned_last_step"])
    # Trials run on after they converge: the horizon is the last step any of them ran.
    horizon = int(max(trained["last_step"].max(), event_step.max())) if len(trained) else None
    return kaplan_meier(event_step.to_numpy(), trained["reached"].to_numpy(), horizon)


def _statistics(trials: pd.DataFrame) -> dict[str, float | int]:
    state = trials["state"]
    survival = _survival(trials)
    low, high = survival.final_interval
    pessimistic = _survival(trials, pruned_never=True) if (state == "PRUNED").any() else survival
    never_low, never_high = pessimistic.final_interval
    median_low, median_high = survival.median_interval()
    finished = trials.loc[state.isin(["COMPLETE", "PRUNED"]), "final_loss"].to_numpy(float)
    finished = finished[np.isfinite(finished)]
    return {
        "trials": len(trials),
        "complete": int((state == "COMPLETE").sum()),
        "pruned": int((state == "PRUNED").sum()),
        "failed": int((state == "FAIL").sum()),
        "diverged": int(trials["diverged"].sum()),
        "trained": survival.trials,
        "converged": int(trials["reached"].sum()),
        "converged_fraction": survival.final,
        "converged_fraction_low": low,
        "converged_fraction_high": high,
        "converged_fraction_pruned_never": pessimistic.final,
        "converged_fraction_pruned_never_low": never_low,
        "converged_fraction_pruned_never_high": never_high,
        "median_steps_to_converge": survival.quantile(0.5),
        "median_steps_to_converge_low": median_low,
        "median_steps_to_converge_high": median_high,
        "steps_to_converge_q25": survival.quantile(0.25),
        "steps_to_converge_q75": survival.quantile(0.75),
        "horizon_step": survival.horizon if survival.trials else None,
        "median_final_loss": float(np.median(finished)) if finished.size else np.nan,
    }


def _verdict(smallest: pd.Series, largest: pd.Series) -> str:
    # Fewer than half converged with either: no median to compare (its interval may still
    # have a lower end, where few trials were followed).
    if pd.isna(smallest["median_steps_to_converge"]) and pd.isna(
        largest["median_steps_to_converge"]
    ):
        return "none converged"
    small_low, small_high = median_bounds(smallest)
    large_low, large_high = median_bounds(largest)
    if small_high < large_low:
        return "more"
    if large_high < small_low:
        return "fewer"
    return "unclear"


PLOTS = {
    "loss_curves": "plots/loss_curves.png",
    "steps_to_converge": "plots/steps_to_converge.png",
    "converged_fraction": "plots/converged_fraction.png",
    "time_to_converge": "plots/time_to_converge.png",
    "truncation_frontier": "plots/truncation_frontier.png",
    "capacity_frontier": "plots/capacity_frontier.png",
}
