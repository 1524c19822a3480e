"""The summary in words: findings as sentences and summary.md, from a summary.Summary.

Every number here was computed by groups.py; this module only chooses which to say and
how. It imports nothing of summary at run time (summary imports it), only the type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd
import yaml

from pipeline.results.tables import TRIAL_STATES
from pipeline.summary.capacity import capacity_finding, capacity_markdown
from pipeline.summary.pruning import PRUNED_READING, pruning_finding
from pipeline.training.data import LN2

if TYPE_CHECKING:
    from pipeline.summary.groups import Comparison, Fastest, Summary


_HEADERS = {
    "num_layers": "layers",
    "state_size": "state size",
    "echo_step": "echo step",
    "truncation": "truncation",
}
_FACTOR_WORDS = {"num_layers": ("layer", "layers"), "state_size": ("unit", "units")}
_CAPTIONS = {
    "loss_curves": "Median loss per group (moving average), inter-quartile band",
    "steps_to_converge": "Median steps to converge over layers × state size",
    "truncation_frontier": "Fraction converged and median steps to converge over echo step × "
    "truncation",
    "converged_fraction": "Converged fraction versus echo step",
    "time_to_converge": "Fraction converged by step (Kaplan–Meier), per level of each factor",
    "capacity_frontier": "Largest echo step learned against state size, per depth",
}
_NO_GRADIENT = "no gradient links an input to its target there"


def findings(summary: Summary) -> tuple[str, ...]:
    """The headline findings, each a sentence built from the summary's numbers."""
    sentences = [
        _progress_finding(summary),
        *(_echo_findings(summary) if summary.truncation is not None else ()),
        *(_frontier_findings(summary) if summary.truncation is None else ()),
        _comparison_finding(summary, "num_layers"),
        _comparison_finding(summary, "state_size"),
        _capacity_finding(summary),
        *_fastest_findings(summary),
        pruning_finding(summary.table, lambda row: _group_name(summary, row)),
        _failure_finding(summary),
    ]
    return tuple(sentence for sentence in sentences if sentence)


def render_markdown(summary: Summary) -> str:
    """summary.md: what was run, the findings, the tables and the plots."""
    factors = list(summary.factors)
    lines = [f"# Convergence summary: {title(summary)}", ""]
    lines += ["## What was run", "", *_what_was_run(summary), ""]
    lines += ["## Findings", "", *(f"- {sentence}" for sentence in summary.findings), ""]
    lines += [f"## By {_and([_HEADERS[f] for f in factors])}", ""]
    lines += [_READING, ""]
    pruned = bool(summary.table["pruned"].sum())
    if pruned:
        lines += [PRUNED_READING, ""]
    lines += _markdown_table(summary.table, factors, pruned)
    if summary.capacity is not None:
        lines += ["", "## Capacity frontier", "", _CAPACITY_READING, ""]
        lines += capacity_markdown(summary.capacity)
    if summary.frontier is not None:
        lines += ["", "## By truncation and echo step", ""]
        lines += ["Pooled over the architectures and seeds.", ""]
        lines += _markdown_table(summary.frontier, ["truncation", "echo_step"], pruned)
    lines += ["", "## By each factor alone", ""]
    lines += [
        "Pooled over the other factors; the same numbers are in `summary_by_factor.parquet`"
        " (`factor`, `value`).",
        "",
    ]
    for factor in factors:
        rows = summary.by_factor[summary.by_factor["factor"] == factor]
        rows = rows.rename(columns={"value": factor})
        lines += [f"### {factor}", "", *_markdown_table(rows, [factor], pruned), ""]
    lines += ["## Plots", ""]
    for path in summary.plots:
        name = path.removeprefix("plots/").removesuffix(".png")
        lines += [f"![{_CAPTIONS[name]}]({path})", ""]
    return "\n".join(lines)


_READING = (
    "`converged`: trials converged of those trained, then the Kaplan–Meier fraction converged "
    "by the last step with its 95 % Wilson interval. `median steps`: the step by which half "
    "converged, with its 95 % interval; `> N` where fewer than half converged within the N "
    "steps the trials were followed. Pruned trials count until they stopped (censored)."
)


_CAPACITY_READING = (
    "Per depth and state size, pooled over seeds: the largest echo step where a majority of "
    "the trials converged (Kaplan–Meier), with that fraction and its 95 % interval there and "
    "at the next echo step run."
)


def _capacity_finding(summary: Summary) -> str | None:
    if summary.capacity is None or summary.capacity.empty:
        return None
    return capacity_finding(summary.capacity, summary.config.train.epochs, summary.truncation)


def _progress_finding(summary: Summary) -> str:
    config, trials = summary.config, summary.trials
    counts = _state_counts(trials)
    if summary.is_single_run:
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
    """Which echo steps were learned, against the fixed truncation length."""
    truncation = summary.truncation
    by_echo = summary.by_factor[
        (summary.by_factor["factor"] == "echo_step") & (summary.by_factor["trained"] > 0)
    ]
    if by_echo.empty:
        return ["No trial trained to an outcome, so nothing can be said about convergence."]
    never = set(summary.never_converged_echo_steps)
    unreachable = set(summary.unreachable_echo_steps)
    beyond = _final_loss_beyond(summary)
    sentences = []
    if never and never == unreachable:
        sentences.append(
            f"{_echo_steps(never)} never converged: exactly the echo steps at or beyond the "
            f"truncation length ({truncation}); {_NO_GRADIENT} ({beyond})."
        )
    else:
        if never & unreachable:
            sentences.append(
                f"{_echo_steps(never & unreachable)}, at or beyond the truncation length "
                f"({truncation}), never converged, as expected: {_NO_GRADIENT} ({beyond})."
            )
        if unreachable - never:
            learned = unreachable - never
            sentences.append(
                f"{_echo_steps(learned)}, at or beyond the truncation length ({truncation}), "
                f"converged in {_converged_count(by_echo, learned)} trials, although "
                f"{_NO_GRADIENT}."
            )
        if never - unreachable:
            stuck = by_echo[by_echo["value"].isin(never - unreachable)]
            losses = _and([_number(v) for v in stuck["median_final_loss"]])
            below = ", below the truncation length," if truncation is not None else ""
            sentences.append(
                f"{_echo_steps(never - unreachable)}{below} never converged within "
                f"{summary.config.train.epochs} epochs (median final loss {losses}; "
                f"ln 2 = {LN2:.3g} is chance)."
            )
    reached = sorted(set(by_echo["value"].astype(int)) - never - unreachable)
    if reached:
        counts = [_converged_count(by_echo, {echo}) for echo in reached]
        respectively = " respectively" if len(reached) > 1 else ""
        sentences.append(
            f"{_echo_steps(reached)} converged in {_and(counts)} trials{respectively}."
        )
    return sentences


def _frontier_findings(summary: Summary) -> list[str]:
    """Where learning stops on the (echo step, truncation) plane, and how it slows near the
    boundary."""
    beyond = summary.by_reach[~summary.by_reach["reachable"].astype(bool)]
    sentences = []
    if len(beyond) and beyond.iloc[0]["trained"] > 0:
        row = beyond.iloc[0]
        if row["converged"] == 0:
            sentences.append(
                f"Learning stops at the truncation: none of the {row['trained']} trials with an "
                f"echo step at or beyond its truncation converged; {_NO_GRADIENT} "
                f"({_final_loss_beyond(summary)})."
            )
        else:
            sentences.append(
                f"{row['converged']} of the {row['trained']} trials with an echo step at or "
                f"beyond its truncation converged, although {_NO_GRADIENT}."
            )
    if not summary.slowdowns:
        return sentences
    reach = [
        f"{int(s.last['echo_step'])} at truncation {s.truncation}"
        + (f" (fewer than half at {_ranges(s.stalled)})" if s.stalled else "")
        for s in summary.slowdowns
    ]
    sentences.append(
        "Largest echo step where most trials converged within "
        f"{summary.config.train.epochs} epochs: {_and(reach)}."
    )
    parts = []
    for s in summary.slowdowns:
        if s.last["echo_step"] == s.first["echo_step"]:
            continue
        gap = s.truncation - int(s.last["echo_step"])
        positions = f"{gap} of {s.truncation} positions" if gap != 1 else f"1 of {s.truncation}"
        parts.append(
            f"at truncation {s.truncation}, {_median_with_interval(s.first)} steps at echo step "
            f"{int(s.first['echo_step'])} against {_median_with_interval(s.last)} at echo step "
            f"{int(s.last['echo_step'])} ({positions} with a signal)"
        )
    if parts:
        slower = [s.truncation for s in summary.slowdowns if s.verdict == "more"]
        if len(slower) == len(parts):
            verdict = "convergence clearly slowed at every truncation (95 % intervals apart)"
        elif slower:
            verdict = (
                f"convergence clearly slowed at truncation {_and([str(t) for t in slower])}; "
                "elsewhere the 95 % intervals overlap, so no clear difference"
            )
        else:
            verdict = "the 95 % intervals overlap at every truncation, so no clear difference"
        sentences.append(
            "As the echo step approaches the truncation, only truncation − echo step positions "
            f"of each window carry a learning signal. Median steps to converge {'; '.join(parts)}"
            f": {verdict}."
        )
    return sentences


def _comparison_finding(summary: Summary, factor: str) -> str | None:
    """Depth or width, compared within each echo step, then summarized."""
    comparisons = [c for c in summary.comparisons if c.factor == factor]
    if not comparisons:
        return None
    levels = comparisons[0].levels[factor]
    small, large = _factor_value(factor, levels.iloc[0]), _factor_value(factor, levels.iloc[-1])
    name = "Depth" if factor == "num_layers" else "Width"
    pooled = "width" if factor == "num_layers" else "depth"
    within = (
        "within each echo step below its truncation"
        if summary.truncation is None
        else f"within each echo step below the truncation length ({summary.truncation})"
    )
    clauses = []
    for verdict, words in (
        ("more", f"{large} took more steps than {small}"),
        ("fewer", f"{large} took fewer steps than {small}"),
    ):
        chosen = [c for c in comparisons if c.verdict == verdict]
        if chosen:
            clauses.append(f"{words} at {_and([_stratum_detail(c) for c in chosen])}")
    unclear = [c for c in comparisons if c.verdict == "unclear"]
    if unclear:
        clauses.append(f"no clear difference at {_strata(unclear)}")
    none = [c for c in comparisons if c.verdict == "none converged"]
    if none:
        clauses.append(f"fewer than half converged with either at {_strata(none)}")
    return (
        f"{name}, {small} against {large}, compared {within} (pooled over {pooled} and seeds; "
        f"a difference is claimed only where the 95 % intervals of the median steps to "
        f"converge are apart): {'; '.join(clauses)}."
    )


def _fastest_findings(summary: Summary) -> list[str]:
    """The fastest group, within each truncation when it varies."""
    if not summary.fastest:
        if len(summary.table) > 1:
            return ["No group had a majority of its trials converged, so none is the fastest."]
        return []
    return [_fastest_finding(summary, fastest) for fastest in summary.fastest]


def _fastest_finding(summary: Summary, fastest: Fastest) -> str:
    row = fastest.row
    where = ", ".join(
        f"{_HEADERS[f]} {row[f]:g}"
        for f in summary.factors
        if f not in _FACTOR_WORDS and f != "truncation"
    )
    caveat = (
        f"; the intervals of {fastest.overlapping} of the other {fastest.candidates - 1} groups "
        "where most converged overlap it, so it is not clearly the fastest"
        if fastest.overlapping
        else ""
    )
    heading = (
        "Fastest group"
        if fastest.truncation is None
        else (f"At truncation {fastest.truncation}, fastest group")
    )
    return (
        f"{heading}, among the {fastest.candidates} where a majority converged: "
        f"{_architecture(row['num_layers'], row['state_size'])} at {where}, median "
        f"{_median_with_interval(row)} steps to converge ({row['converged_fraction']:.0%} "
        f"converged by Kaplan–Meier; {row['converged']:.0f} of {row['trained']:.0f} trials seen "
        "to converge)"
        f"{caveat}."
    )


def _group_name(summary: Summary, row: dict) -> str:
    """A group by its factors that vary: `echo step 3`, `2 layers × 8 units at echo step 3`."""
    varying = [f for f in summary.factors if summary.table[f].nunique() > 1]
    architecture = [f for f in varying if f in _FACTOR_WORDS]
    rest = ", ".join(f"{_HEADERS[f]} {row[f]:g}" for f in varying if f not in _FACTOR_WORDS)
    if not architecture:
        return rest
    name = _architecture(row["num_layers"], row["state_size"])
    return f"{name} at {rest}" if rest else name


def _failure_finding(summary: Summary) -> str:
    trials = summary.trials
    pruned = int((trials["status"] == "pruned").sum())
    diverged = int(trials["diverged"].sum())
    crashed = trials[trials["status"] == "error"]
    parts = []
    if diverged:
        parts.append(f"{diverged} diverged (the loss became non-finite; counted as not converged)")
    if len(crashed):
        first = crashed["error"].dropna()
        example = f": {first.iloc[0]}" if len(first) else ""
        parts.append(f"{len(crashed)} raised an error and are left out{example}")
    if pruned:
        parts.append(
            f"{pruned} were pruned (censored where they stopped: they count as not converged "
            "only up to that step)"
        )
    if not parts:
        return "No trial failed, diverged or was pruned."
    return f"Of {len(trials)} trials, " + "; ".join(parts) + "."


def _what_was_run(summary: Summary) -> list[str]:
    config, trials = summary.config, summary.trials
    study = config.study
    lines = []
    if summary.is_single_run:
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
        pooled = [f"`{p.key}`" for p in study.search if p.short_name not in summary.factors]
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
    lines.append(f"- {'Config' if summary.is_single_run else 'Every trial'}: {values}.")
    if summary.truncation is not None:
        lines.append(
            f"- {config.train.epochs} epochs of {config.task.windows_per_epoch} windows of "
            f"{config.task.truncation} steps: {config.total_steps} steps (updates) per trial."
        )
    else:
        lines.append(
            f"- {config.train.epochs} epochs of {config.task.columns} // truncation windows: "
            "a step (update) covers `truncation` time steps, so trials of a shorter truncation "
            "run more, shorter steps."
        )
    lines.append(f"- Trials by state: {_state_counts(trials)}.")
    lines.append(
        f"- Converged: the first step s at which the mean loss over steps (s − "
        f"{config.convergence.window}, s] is below {config.convergence.threshold:g} "
        f"(`convergence.window`, `convergence.threshold`)."
    )
    lines.append(
        "- Counted: complete, pruned and diverged trials (a diverged one never converges); "
        "trials that raised an error are left out. Time to converge is censored data: a "
        "trial that did not converge counts until its last step (a pruned one until it was "
        "stopped), and the fraction converged by each step is the Kaplan–Meier estimate. "
        "Intervals are 95 %: Wilson's for fractions, and for medians the steps where the "
        "fraction's interval reaches one half. The final loss (mean over the last epoch "
        "reached) is over COMPLETE and PRUNED trials."
    )
    return lines


def _markdown_table(frame: pd.DataFrame, keys: Sequence[str], pruned: bool = False) -> list[str]:
    """The statistics of each row of `frame` by `keys`; with `pruned`, the converged fraction
    with pruned trials counted as never converging beside Kaplan–Meier's."""
    headers = [
        *(_HEADERS[key] for key in keys),
        "trials",
        "converged",
        *(["pruned as never converged"] if pruned else []),
        "median steps (95 % CI)",
        "quartiles of steps",
        "median final loss",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
    for row in frame.to_dict("records"):
        cells = [f"{row[key]:g}" for key in keys]
        cells += [
            _trial_counts(row),
            _converged_cell(row),
            *([_fraction_with_interval(row, "converged_fraction_pruned_never")] if pruned else []),
            _median_with_interval(row),
            _quartiles(row),
            _number(row["median_final_loss"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _converged_cell(row: dict | pd.Series) -> str:
    counts = f"{row['converged']}/{row['trained']}"
    if pd.isna(row["converged_fraction"]):
        return counts
    return f"{counts} ({row['converged_fraction']:.0%}; {_interval(row, 'converged_fraction')})"


def _fraction_with_interval(row: dict | pd.Series, column: str) -> str:
    """`40% (12%–77%)`: a fraction and its 95 % interval; – when no trial trained."""
    if pd.isna(row[column]):
        return "–"
    return f"{row[column]:.0%} ({_interval(row, column)})"


def _interval(row: dict | pd.Series, column: str) -> str:
    return f"{row[f'{column}_low']:.0%}–{row[f'{column}_high']:.0%}"


def _median_with_interval(row: dict | pd.Series) -> str:
    """`250 [200, 300]`, `> 1331 [400, > 1331]` or `> 1331`; – when no trial trained."""
    if pd.isna(row["horizon_step"]):
        return "–"
    beyond = f"> {row['horizon_step']:.0f}"
    median = row["median_steps_to_converge"]
    low, high = row["median_steps_to_converge_low"], row["median_steps_to_converge_high"]
    text = beyond if pd.isna(median) else f"{median:.0f}"
    if pd.isna(low):
        return text
    return f"{text} [{low:.0f}, {beyond if pd.isna(high) else f'{high:.0f}'}]"


def _quartiles(row: dict) -> str:
    if pd.isna(row["horizon_step"]) or pd.isna(row["steps_to_converge_q25"]):
        return "–"
    q75 = row["steps_to_converge_q75"]
    high = f"> {row['horizon_step']:.0f}" if pd.isna(q75) else f"{q75:.0f}"
    return f"{row['steps_to_converge_q25']:.0f}–{high}"


def _trial_counts(row: dict) -> str:
    extra = [f"{row[k]} {k}" for k in ("pruned", "failed") if row[k]]
    return f"{row['trials']}" + (f" ({', '.join(extra)})" if extra else "")


def _stratum(comparison: Comparison) -> str:
    return ", ".join(f"{_HEADERS[k]} {v}" for k, v in comparison.stratum.items())


def _strata(comparisons: Sequence[Comparison]) -> str:
    if all(list(c.stratum) == ["echo_step"] for c in comparisons):
        return _echo_steps([c.stratum["echo_step"] for c in comparisons]).lower()
    return _and([_stratum(c) for c in comparisons])


def _stratum_detail(comparison: Comparison) -> str:
    small, large = comparison.levels.iloc[0], comparison.levels.iloc[-1]
    return (
        f"{_stratum(comparison)} (median {_median_with_interval(small)} against "
        f"{_median_with_interval(large)})"
    )


def _final_loss_beyond(summary: Summary) -> str:
    beyond = summary.by_reach[~summary.by_reach["reachable"].astype(bool)]
    if beyond.empty or pd.isna(beyond.iloc[0]["median_final_loss"]):
        return "no final loss"
    loss = beyond.iloc[0]["median_final_loss"]
    return f"median final loss {_number(loss)}; ln 2 = {LN2:.3g} is chance"


def title(summary: Summary) -> str:
    """What the summary is of: a study by name, or a single train run."""
    config = summary.config
    if summary.is_single_run:
        return f"train run ({config.model.num_layers} layers × {config.model.state_size} units)"
    return f"study {config.study.name}"


def _number(value: float) -> str:
    return "–" if pd.isna(value) else f"{value:.3g}"


def _and(parts: Sequence[str]) -> str:
    parts = list(parts)
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _ranges(values: Sequence[int]) -> str:
    """1, 2, 3, 5 → "echo steps 1–3 and 5"."""
    values = sorted(values)
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    text = [f"{r[0]}–{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs]
    return f"echo step{'s' if len(values) > 1 else ''} {_and(text)}"


def _state_counts(trials: pd.DataFrame) -> str:
    counts = trials["state"].value_counts()
    return ", ".join(f"{int(counts.get(state, 0))} {state}" for state in TRIAL_STATES)


def _echo_steps(values: set[int] | Sequence[int]) -> str:
    values = sorted(int(v) for v in values)
    if len(values) == 1:
        return f"Echo step {values[0]}"
    return f"Echo steps {', '.join(map(str, values[:-1]))} and {values[-1]}"


def _converged_count(by_echo: pd.DataFrame, echo_steps: set[int]) -> str:
    rows = by_echo[by_echo["value"].isin(echo_steps)]
    return f"{int(rows['converged'].sum())} of {int(rows['trained'].sum())}"


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
