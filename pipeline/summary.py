"""Convergence: per-trial metrics from the per-step losses, and the study's summary.

The summary groups a study's finished trials by (num_layers, state_size, echo_step), pooling
whatever else varies (seeds, learning rates), and writes into the output folder:

    summary.parquet            one row per group
    summary_by_factor.parquet  the same statistics over each factor alone: `factor` names it
                               (num_layers, state_size or echo_step), `value` is its value
    summary.md                 what was run, the findings in sentences, the tables
    plots/loss_curves.png, plots/steps_to_converge.png, plots/converged_fraction.png

Which trials count: every finished trial is in `trials` and in the counts by state. A trial
that trained to an outcome (COMPLETE, PRUNED, or FAIL because its loss diverged) is in
`trained`, the denominator of `converged_fraction`; a trial that raised an error or lost its
worker says nothing about convergence and is left out. A diverged trial never converged, even
if its moving average had dipped below the threshold first; a pruned trial counts as converged
only if it got there before it was stopped. Steps to converge are summarized over the
converged trials (null when none converged); the final loss over COMPLETE and PRUNED trials.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.config import Config, ConfigError, ConvergenceConfig, config_from_dict
from pipeline.plots import (
    converged_fraction_figure,
    loss_curves_figure,
    png_bytes,
    steps_to_converge_figure,
)
from pipeline.results import (
    CONFIG,
    PARAM_TYPES,
    TRIALS,
    Output,
    load_steps,
    read_steps_outcomes,
)

GROUP = ["num_layers", "state_size", "echo_step"]
SUMMARY = "summary.parquet"
SUMMARY_BY_FACTOR = "summary_by_factor.parquet"
SUMMARY_MD = "summary.md"
PLOTS = {
    "loss_curves": "plots/loss_curves.png",
    "steps_to_converge": "plots/steps_to_converge.png",
    "converged_fraction": "plots/converged_fraction.png",
}
LN2 = math.log(2)
# Medians of steps to converge this close (relative) say nothing about a factor's effect.
SAME_WITHIN = 0.1
STATES = ("COMPLETE", "PRUNED", "FAIL")
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
    "median_steps_to_converge": pa.float64(),
    "steps_to_converge_q25": pa.float64(),
    "steps_to_converge_q75": pa.float64(),
    "median_final_loss": pa.float64(),
}
_HEADERS = {"num_layers": "layers", "state_size": "state size", "echo_step": "echo step"}
_FACTOR_WORDS = {"num_layers": ("layer", "layers"), "state_size": ("unit", "units")}


@dataclass(frozen=True)
class TrialMetrics:
    """How one trial's loss evolved; every field is derived from its per-step losses."""

    final_loss: float
    """Mean loss over the last epoch the trial reached."""
    mean_loss: float
    """Mean loss over every step."""
    steps_to_converge: int | None
    """First step at which the moving-average loss is below the threshold; None if never."""

    @property
    def converged(self) -> bool:
        return self.steps_to_converge is not None


def trial_metrics(
    losses: np.ndarray, windows_per_epoch: int, convergence: ConvergenceConfig
) -> TrialMetrics:
    """Metrics of one trial's losses. A trial that ran no step has NaN losses; a trial whose
    last loss is not finite diverged and never counts as converged, even if it had been
    below the threshold before."""
    if len(losses) == 0:
        return TrialMetrics(float("nan"), float("nan"), None)
    last_epoch_start = (len(losses) - 1) // windows_per_epoch * windows_per_epoch
    diverged = not np.isfinite(losses[-1])
    return TrialMetrics(
        final_loss=float(np.mean(losses[last_epoch_start:])),
        mean_loss=float(np.mean(losses)),
        steps_to_converge=None
        if diverged
        else steps_to_converge(losses, convergence.threshold, convergence.window),
    )


def steps_to_converge(losses: np.ndarray, threshold: float, window: int) -> int | None:
    """The first step s at which the mean loss over steps (s - window, s] is below `threshold`.

    A non-finite loss makes every average that includes it non-finite, so it never counts as
    converged; a trial shorter than `window` never converges.
    """
    if len(losses) < window:
        return None
    averages = np.convolve(np.asarray(losses, np.float64), np.full(window, 1.0 / window), "valid")
    below = np.flatnonzero(averages < threshold)
    return int(below[0]) + window - 1 if below.size else None


def objective_value(metrics: TrialMetrics, objective: str) -> float:
    """The value a study minimizes: `final_loss` or `mean_loss`."""
    return getattr(metrics, objective)


@dataclass(frozen=True)
class Summary:
    """What `write_summary` computed and wrote."""

    config: Config
    trials: pd.DataFrame
    """One row per finished trial, as in trials.parquet, plus `diverged`, `trained` and
    `reached` (converged by the counting rule of this module)."""
    table: pd.DataFrame
    """summary.parquet: one row per (num_layers, state_size, echo_step)."""
    by_factor: pd.DataFrame
    """summary_by_factor.parquet: one row per value of each factor alone."""
    findings: tuple[str, ...]
    """The headline findings, in sentences derived from the numbers."""
    never_converged_echo_steps: tuple[int, ...]
    """Echo steps with trained trials of which none converged."""
    unreachable_echo_steps: tuple[int, ...]
    """Echo steps run that are at or beyond the truncation length."""
    files: tuple[str, ...]
    """What was written, relative to the output folder."""


def write_summary(output: str) -> Summary:
    """Summarize the finished trials in `output` (a study, running, interrupted or done, or a
    single `train` run) and write summary.parquet, summary_by_factor.parquet, summary.md and
    plots/*.png there. Raises ConfigError, writing nothing, if `output` is no echo-study output
    or holds no finished trial."""
    location = Output(output)
    config = _read_config(location)
    trials = finished_trials(location)
    if trials.empty:
        raise ConfigError(f"{output}: no finished trials yet, nothing to summarize")
    summary = summarize(config, trials)
    curves = loss_curves(_steps(location), summary.trials, config.convergence.window)
    # Everything is computed before the first write, so bad data leaves the folder untouched.
    tables = {
        SUMMARY: _arrow_table(summary.table, _schema(GROUP)),
        SUMMARY_BY_FACTOR: _arrow_table(
            summary.by_factor, pa.schema([("factor", pa.string()), ("value", pa.int32())])
        ),
    }
    blobs = {name: png_bytes(figure) for name, figure in _figures(summary, curves).items()}
    blobs[SUMMARY_MD] = render_markdown(summary).encode()
    for name, table in tables.items():
        location.write_table(name, table)
    for name, data in blobs.items():
        location.write_bytes(name, data)
    return dataclasses.replace(summary, files=(*tables, SUMMARY_MD, *PLOTS.values()))


def finished_trials(output: Output) -> pd.DataFrame:
    """One row per finished trial: trials.parquet, updated by the outcome that each steps file
    records, so that a trial whose steps were written after trials.parquet still counts."""
    rows: dict[int, dict] = {}
    if output.exists(TRIALS):
        with output.fs.open_input_file(output.path(TRIALS)) as file:
            rows = {row["trial"]: row for row in pq.read_table(file).to_pylist()}
    rows.update(read_steps_outcomes(output))
    trials = pd.DataFrame([rows[number] for number in sorted(rows)])
    if trials.empty:
        return trials
    trials["steps_to_converge"] = trials["steps_to_converge"].astype("Int64")
    trials["final_loss"] = trials["final_loss"].astype(float)
    trials["converged"] = trials["converged"].eq(True)
    return trials


def summarize(config: Config, trials: pd.DataFrame) -> Summary:
    """The tables and findings of a study's finished trials (rows as in trials.parquet)."""
    trials = _with_counting_rule(trials)
    table = group_table(trials, GROUP)
    by_factor = pd.concat(
        [
            group_table(trials, [factor]).rename(columns={factor: "value"}).assign(factor=factor)
            for factor in GROUP
        ],
        ignore_index=True,
    )
    by_factor = by_factor[["factor", "value", *STATISTICS]]
    by_echo = by_factor[(by_factor["factor"] == "echo_step") & (by_factor["trained"] > 0)]
    never = tuple(int(e) for e in by_echo.loc[by_echo["converged"] == 0, "value"])
    truncation = _fixed_truncation(config)
    unreachable = tuple(
        int(e) for e in by_echo["value"] if truncation is not None and e >= truncation
    )
    summary = Summary(config, trials, table, by_factor, (), never, unreachable, ())
    return dataclasses.replace(summary, findings=tuple(_findings(summary)))


def group_table(trials: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """The statistics of STATISTICS for the trials of each value of `by` (the rule is in the
    module docstring); `trials` needs the columns that `summarize` adds."""
    rows = [
        {**dict(zip(by, key, strict=True)), **_statistics(group)}
        for key, group in trials.groupby(list(by), sort=True)
    ]
    return pd.DataFrame(rows, columns=[*by, *STATISTICS])


def loss_curves(steps: pd.DataFrame, trials: pd.DataFrame, window: int) -> pd.DataFrame:
    """Per group and step, the quartiles over the group's trained trials of each trial's
    trailing mean loss over up to `window` steps (non-finite losses left out).

    Columns: the group's factors, `step`, `q25`, `median`, `q75`, `trials` (how many reached
    that step)."""
    trained = trials.loc[trials["trained"], ["trial", *GROUP]]
    steps = steps.merge(trained, on="trial").sort_values(["trial", "step"])
    loss = steps["loss"].astype(float).where(np.isfinite(steps["loss"]))
    steps = steps.assign(smooth=loss.groupby(steps["trial"]).transform(_trailing_mean(window)))
    frames = []
    for key, group in steps.groupby(GROUP, sort=True):
        by_step = group.pivot(index="step", columns="trial", values="smooth")
        quartiles = by_step.quantile([0.25, 0.5, 0.75], axis=1).T
        frames.append(
            pd.DataFrame(
                {
                    **dict(zip(GROUP, key, strict=True)),
                    "step": by_step.index.to_numpy(),
                    "q25": quartiles[0.25].to_numpy(),
                    "median": quartiles[0.5].to_numpy(),
                    "q75": quartiles[0.75].to_numpy(),
                    "trials": by_step.notna().sum(axis=1).to_numpy(),
                }
            )
        )
    columns = [*GROUP, "step", "q25", "median", "q75", "trials"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def render_markdown(summary: Summary) -> str:
    """summary.md: what was run, the findings, the tables and the plots."""
    lines = [f"# Convergence summary: {_title(summary.config)}", ""]
    lines += ["## What was run", "", *_what_was_run(summary), ""]
    lines += ["## Findings", "", *(f"- {sentence}" for sentence in summary.findings), ""]
    lines += ["## By layers, state size and echo step", ""]
    lines += _markdown_table(summary.table, GROUP)
    lines += ["", "## By each factor alone", ""]
    lines += [
        "Pooled over the other two factors; the same numbers are in `summary_by_factor.parquet`"
        " (`factor`, `value`).",
        "",
    ]
    for factor in GROUP:
        rows = summary.by_factor[summary.by_factor["factor"] == factor]
        rows = rows.rename(columns={"value": factor})
        lines += [f"### {factor}", "", *_markdown_table(rows, [factor])]
        lines.append("")
    lines += ["## Plots", ""]
    captions = {
        "loss_curves": "Median loss per group (moving average), inter-quartile band",
        "steps_to_converge": "Median steps to converge over layers × state size",
        "converged_fraction": "Converged fraction versus echo step",
    }
    for name, path in PLOTS.items():
        lines += [f"![{captions[name]}]({path})", ""]
    return "\n".join(lines)


def _read_config(output: Output) -> Config:
    if not output.exists():
        raise ConfigError(f"{output.location}: no such folder")
    if not output.exists(CONFIG):
        raise ConfigError(f"{output.location}: not an echo-study output (no {CONFIG} in it)")
    try:
        return config_from_dict(yaml.safe_load(output.read_text(CONFIG)), output.path(CONFIG))
    except (ConfigError, yaml.YAMLError, UnicodeDecodeError) as error:
        message = str(error).splitlines()[0]
        raise ConfigError(f"{output.path(CONFIG)}: unreadable ({message})") from None


def _with_counting_rule(trials: pd.DataFrame) -> pd.DataFrame:
    """Add `diverged`, `trained` and `reached`: see the module docstring."""
    error = trials["error"] if "error" in trials else pd.Series(None, index=trials.index)
    diverged = (trials["state"] == "FAIL") & error.fillna("").str.startswith("diverged")
    trained = trials["state"].isin(["COMPLETE", "PRUNED"]) | diverged
    reached = trained & ~diverged & trials["converged"] & trials["steps_to_converge"].notna()
    return trials.assign(diverged=diverged, trained=trained, reached=reached)


def _statistics(trials: pd.DataFrame) -> dict[str, float | int]:
    state = trials["state"]
    trained = int(trials["trained"].sum())
    steps = trials.loc[trials["reached"], "steps_to_converge"].to_numpy(float)
    finished = trials.loc[state.isin(["COMPLETE", "PRUNED"]), "final_loss"].to_numpy(float)
    finished = finished[np.isfinite(finished)]
    q25, median, q75 = np.quantile(steps, [0.25, 0.5, 0.75]) if steps.size else [np.nan] * 3
    return {
        "trials": len(trials),
        "complete": int((state == "COMPLETE").sum()),
        "pruned": int((state == "PRUNED").sum()),
        "failed": int((state == "FAIL").sum()),
        "diverged": int(trials["diverged"].sum()),
        "trained": trained,
        "converged": len(steps),
        "converged_fraction": len(steps) / trained if trained else np.nan,
        "median_steps_to_converge": median,
        "steps_to_converge_q25": q25,
        "steps_to_converge_q75": q75,
        "median_final_loss": float(np.median(finished)) if finished.size else np.nan,
    }


def _schema(keys: Sequence[str]) -> pa.Schema:
    return pa.schema([(key, PARAM_TYPES[key]) for key in keys])


def _arrow_table(frame: pd.DataFrame, keys: pa.Schema) -> pa.Table:
    """The frame as a Parquet table: the keys' types, then STATISTICS; NaN becomes null."""
    schema = pa.schema([*keys, *STATISTICS.items()])
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def _figures(summary: Summary, curves: pd.DataFrame) -> dict[str, object]:
    config = summary.config
    title = _title(config)
    truncation = _fixed_truncation(config)
    by_layers = group_table(summary.trials, ["num_layers", "echo_step"])
    return {
        PLOTS["loss_curves"]: loss_curves_figure(
            curves,
            threshold=config.convergence.threshold,
            window=config.convergence.window,
            truncation=truncation,
            epoch_steps=config.task.windows_per_epoch,
            title=title,
        ),
        PLOTS["steps_to_converge"]: steps_to_converge_figure(
            summary.table, truncation=truncation, title=title
        ),
        PLOTS["converged_fraction"]: converged_fraction_figure(
            by_layers, truncation=truncation, title=title
        ),
    }


def _title(config: Config) -> str:
    if _is_single_run(config):
        return f"train run ({config.model.num_layers} layers × {config.model.state_size} units)"
    return f"study {config.study.name}"


def _fixed_truncation(config: Config) -> int | None:
    """The truncation length of every trial; None when the study searches it."""
    searched = any(p.key == "task.truncation" for p in config.study.search)
    return None if searched else config.task.truncation


def _steps(output: Output) -> pd.DataFrame:
    """Every trial's losses, or none when no steps file was written (trials.parquet alone)."""
    try:
        return load_steps(output.location, columns=["trial", "step", "loss"])
    except FileNotFoundError:
        return pd.DataFrame({"trial": [], "step": [], "loss": []})


def _is_single_run(config: Config) -> bool:
    # A study always searches something; `train` writes a config with an empty search.
    return not config.study.search


def _findings(summary: Summary) -> list[str]:
    findings = [
        _progress_finding(summary),
        *_echo_findings(summary),
        _factor_finding(summary, "num_layers"),
        _factor_finding(summary, "state_size"),
        _fastest_finding(summary),
        _failure_finding(summary),
    ]
    return [sentence for sentence in findings if sentence]


def _progress_finding(summary: Summary) -> str:
    config, trials = summary.config, summary.trials
    counts = _state_counts(trials)
    if _is_single_run(config):
        run = trials.iloc[0]
        reached = (
            f"converged at step {run['steps_to_converge']}" if run["reached"] else "never converged"
        )
        return (
            f"A single `train` run (trial 0), {run['state']}: it {reached}; "
            f"final loss {_number(run['final_loss'])}."
        )
    planned = config.study.n_trials
    if len(trials) < planned:
        return (
            f"Only {len(trials)} of the study's {planned} trials have finished ({counts}): the "
            "study is still running or was interrupted, and this summary covers those."
        )
    return f"{len(trials)} trials finished ({counts})."


def _echo_findings(summary: Summary) -> list[str]:
    config, trials = summary.config, summary.trials
    truncation = _fixed_truncation(config)
    by_echo = summary.by_factor[
        (summary.by_factor["factor"] == "echo_step") & (summary.by_factor["trained"] > 0)
    ]
    if by_echo.empty:
        return ["No trial trained to an outcome, so nothing can be said about convergence."]
    never, unreachable = (
        set(summary.never_converged_echo_steps),
        set(summary.unreachable_echo_steps),
    )
    reason = "no gradient links an input to its target there"
    sentences = []
    if never and never == unreachable:
        sentences.append(
            f"{_echo_steps(never)} never converged: exactly the echo steps at or beyond the "
            f"truncation length ({truncation}); {reason} ({_final_loss(trials, never)})."
        )
    else:
        if never & unreachable:
            sentences.append(
                f"{_echo_steps(never & unreachable)}, at or beyond the truncation length "
                f"({truncation}), never converged, as expected: {reason} "
                f"({_final_loss(trials, never & unreachable)})."
            )
        if unreachable - never:
            learned = unreachable - never
            sentences.append(
                f"{_echo_steps(learned)}, at or beyond the truncation length ({truncation}), "
                f"converged in {_converged_count(by_echo, learned)} trials, although {reason}."
            )
        if never - unreachable:
            below = ", below the truncation length," if truncation is not None else ""
            sentences.append(
                f"{_echo_steps(never - unreachable)}{below} never converged within "
                f"{config.train.epochs} epochs ({_final_loss(trials, never - unreachable)})."
            )
    reached = sorted(set(by_echo["value"].astype(int)) - never - unreachable)
    if reached:
        counts = [_converged_count(by_echo, {echo}) for echo in reached]
        respectively = " respectively" if len(reached) > 1 else ""
        sentences.append(
            f"{_echo_steps(reached)} converged in {_and(counts)} trials{respectively}."
        )
    return sentences


def _factor_finding(summary: Summary, factor: str) -> str | None:
    """How the median steps to converge (over converged trials) and the converged count change
    with `factor`, pooled over the other factors and over the echo steps within reach."""
    trials = summary.trials[summary.trials["trained"]]
    scope = "pooled over the other factors"
    reachable = ~trials["echo_step"].isin(summary.unreachable_echo_steps)
    if summary.unreachable_echo_steps and reachable.any():
        trials = trials[reachable]
        scope = "echo steps below the truncation length, pooled over the other factors"
    rows = group_table(trials, [factor])
    if len(rows) < 2:
        return None
    name = "Depth" if factor == "num_layers" else "Width"
    parts = [
        f"{_median_steps(row['median_steps_to_converge'])} with "
        f"{_factor_value(factor, row[factor])} ({row['converged']} of {row['trained']} "
        "converged)"
        for row in rows.to_dict("records")
    ]
    medians = rows["median_steps_to_converge"].dropna().to_numpy()
    more = "more layers" if factor == "num_layers" else "more units"
    if len(medians) < 2:
        trend = "too few converged groups to compare"
    elif medians.max() < (1 + SAME_WITHIN) * medians.min():
        trend = f"{more} changed it by less than {SAME_WITHIN:.0%}"
    elif np.all(np.diff(medians) > 0):
        trend = f"with {more}, convergence took more steps"
    elif np.all(np.diff(medians) < 0):
        trend = f"with {more}, convergence took fewer steps"
    else:
        trend = f"no steady trend with {more}"
    return f"{name} ({scope}): median steps to converge {_and(parts)}; {trend}."


def _fastest_finding(summary: Summary) -> str | None:
    table = summary.table.dropna(subset=["median_steps_to_converge"])
    if table.empty or len(summary.table) < 2:
        return None
    best = table.loc[table["median_steps_to_converge"].idxmin()]
    return (
        f"Fastest group: {_architecture(best['num_layers'], best['state_size'])} at echo step "
        f"{best['echo_step']:g}, median {best['median_steps_to_converge']:.0f} steps to "
        f"converge ({best['converged']:.0f}/{best['trained']:.0f} converged)."
    )


def _failure_finding(summary: Summary) -> str:
    trials = summary.trials
    pruned = int((trials["state"] == "PRUNED").sum())
    diverged = int(trials["diverged"].sum())
    crashed = trials[(trials["state"] == "FAIL") & ~trials["diverged"]]
    parts = []
    if diverged:
        parts.append(f"{diverged} diverged (the loss became non-finite; counted as not converged)")
    if len(crashed):
        first = crashed["error"].dropna()
        example = f": {first.iloc[0]}" if len(first) else ""
        parts.append(f"{len(crashed)} raised an error and are left out{example}")
    if pruned:
        parts.append(f"{pruned} were pruned (counted as converged only if they got there before)")
    if not parts:
        return "No trial failed, diverged or was pruned."
    return f"Of {len(trials)} trials, " + "; ".join(parts) + "."


def _what_was_run(summary: Summary) -> list[str]:
    config, trials = summary.config, summary.trials
    study = config.study
    lines = []
    if _is_single_run(config):
        lines.append(f"- A single `python -m pipeline train` run, seed {config.train.seed}.")
    else:
        pruner = "no pruner" if study.pruner == "none" else f"the {study.pruner} pruner"
        lines.append(
            f"- Study `{study.name}`: {study.sampler} sampler, {pruner}, objective "
            f"`{study.objective}`, study seed {study.seed}; {len(trials)} of {study.n_trials} "
            f"trials finished."
        )
        lines.append("- Search space:")
        lines += [f"  - `{p.key}`: {_search_values(p.to_yaml())}" for p in study.search]
        pooled = [f"`{p.key}`" for p in study.search if p.short_name not in GROUP]
        if pooled:
            lines.append(f"- Each group pools its trials over {_and(pooled)}.")
    searched = {p.key for p in study.search}
    fixed = [
        "task.series_length",
        "task.batch_size",
        "task.truncation",
        "task.echo_step",
        "model.num_layers",
        "model.state_size",
        "train.epochs",
        "train.lr",
        "train.carry_state",
    ]
    values = ", ".join(
        f"`{key}` = {_yaml_value(config.value(key))}" for key in fixed if key not in searched
    )
    lines.append(f"- {'Config' if _is_single_run(config) else 'Every trial'}: {values}.")
    lines.append(
        f"- {config.train.epochs} epochs of {config.task.windows_per_epoch} windows of "
        f"{config.task.truncation} steps: {config.total_steps} steps (updates) per trial."
    )
    lines.append(f"- Trials by state: {_state_counts(trials)}.")
    lines.append(
        f"- Converged: the first step s at which the mean loss over steps (s − "
        f"{config.convergence.window}, s] is below {config.convergence.threshold:g} "
        f"(`convergence.window`, `convergence.threshold`)."
    )
    lines.append(
        "- Counted: COMPLETE and PRUNED trials, and FAIL trials whose loss diverged (never "
        "converged); trials that raised an error are left out. `converged` is out of those "
        "trained trials; steps to converge (median and inter-quartile range) are over the "
        "converged ones, the final loss (mean over the last epoch reached) over COMPLETE and "
        "PRUNED ones."
    )
    return lines


def _markdown_table(frame: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    headers = [
        *(_HEADERS[key] for key in keys),
        "trials",
        "converged",
        "median steps to converge",
        "IQR of steps",
        "median final loss",
    ]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "---:|" * len(headers),
    ]
    for row in frame.to_dict("records"):
        cells = [f"{row[key]:g}" for key in keys]
        cells += [
            _trial_counts(row),
            f"{row['converged']}/{row['trained']}" + _percent(row["converged_fraction"]),
            _median_steps(row["median_steps_to_converge"], plain=True),
            _interval(row["steps_to_converge_q25"], row["steps_to_converge_q75"]),
            _number(row["median_final_loss"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _trial_counts(row: dict) -> str:
    extra = [f"{row[k]} {k}" for k in ("pruned", "failed") if row[k]]
    return f"{row['trials']}" + (f" ({', '.join(extra)})" if extra else "")


def _percent(fraction: float) -> str:
    return "" if pd.isna(fraction) else f" ({fraction:.0%})"


def _median_steps(value: float, plain: bool = False) -> str:
    if pd.isna(value):
        return "–" if plain else "never converged"
    return f"{value:.0f}"


def _interval(low: float, high: float) -> str:
    return "–" if pd.isna(low) else f"{low:.0f}–{high:.0f}"


def _number(value: float) -> str:
    return "–" if pd.isna(value) else f"{value:.3g}"


def _and(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _state_counts(trials: pd.DataFrame) -> str:
    counts = trials["state"].value_counts()
    return ", ".join(f"{int(counts.get(state, 0))} {state}" for state in STATES)


def _echo_steps(values: set[int] | Sequence[int]) -> str:
    values = sorted(int(v) for v in values)
    if len(values) == 1:
        return f"Echo step {values[0]}"
    return f"Echo steps {', '.join(map(str, values[:-1]))} and {values[-1]}"


def _converged_count(by_echo: pd.DataFrame, echo_steps: set[int]) -> str:
    rows = by_echo[by_echo["value"].isin(echo_steps)]
    return f"{int(rows['converged'].sum())} of {int(rows['trained'].sum())}"


def _final_loss(trials: pd.DataFrame, echo_steps: set[int]) -> str:
    chosen = trials[trials["echo_step"].isin(echo_steps) & trials["state"].isin(STATES[:2])]
    finals = chosen["final_loss"].to_numpy(float)
    finals = finals[np.isfinite(finals)]
    if not finals.size:
        return "no final loss"
    return f"median final loss {_number(np.median(finals))}; ln 2 = {LN2:.3g} is chance"


def _factor_value(factor: str, value: float) -> str:
    one, many = _FACTOR_WORDS[factor]
    return f"{value:g} {one if value == 1 else many}"


def _architecture(num_layers: float, state_size: float) -> str:
    return f"{_factor_value('num_layers', num_layers)} × {state_size:g} units"


def _search_values(spec: object) -> str:
    if isinstance(spec, list):
        return ", ".join(str(v) for v in spec)
    scale = " (log scale)" if spec.get("log") else ""
    step = f" in steps of {spec['step']}" if spec.get("step") else ""
    return f"{spec['low']} to {spec['high']}{step}{scale}"


def _yaml_value(value: object) -> str:
    """A value as YAML writes it: true, null, 0.3."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()


def _trailing_mean(window: int):
    def mean(losses: pd.Series) -> pd.Series:
        return losses.rolling(window, min_periods=1).mean()

    return mean
