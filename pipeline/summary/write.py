"""Writing a study's summary: summary.parquet, summary_by_factor.parquet, summary.md and the
plots, from the finished trials of an output (a running study's too)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config, ConfigError
from pipeline.results.output import TRIALS, Output, read_config
from pipeline.results.tables import PARAM_TYPES, load_steps, read_steps_outcomes
from pipeline.summary.forked import start_in_child
from pipeline.summary.groups import (
    PLOTS,
    STATISTICS,
    TRUNCATION,
    Summary,
    group_table,
    loss_curves,
    summary_numbers,
)
from pipeline.summary.words import findings, render_markdown, title

SUMMARY = "summary.parquet"


SUMMARY_BY_FACTOR = "summary_by_factor.parquet"


SUMMARY_MD = "summary.md"


SUMMARY_CAPACITY = "summary_capacity.parquet"


def summarize(config: Config, trials: pd.DataFrame) -> Summary:
    """The numbers of a study's finished trials (rows as in trials.parquet, with `status`),
    and the findings that words.py says of them."""
    summary = summary_numbers(config, trials)
    return dataclasses.replace(summary, findings=findings(summary))


def write_summary(output: str) -> Summary:
    """Summarize the finished trials in `output` (a study, running, interrupted or done, or a
    single `train` run) and write summary.parquet, summary_by_factor.parquet, summary.md and
    plots/*.png there (and summary_capacity.parquet when the study varies state size and echo
    step). Raises ConfigError, writing nothing, if `output` is no echo-study output
    or holds no finished trial."""
    location = Output(output)
    config = _read_config(location)
    trials = finished_trials(location)
    if trials.empty:
        raise ConfigError(f"{output}: no finished trials yet, nothing to summarize")
    summary = summarize(config, trials)
    # Everything is computed before the first write, so bad data leaves the folder untouched.
    keys = list(summary.factors)
    tables = {
        SUMMARY: _arrow_table(summary.table, _schema(keys)),
        SUMMARY_BY_FACTOR: _arrow_table(
            summary.by_factor, pa.schema([("factor", pa.string()), ("value", pa.int32())])
        ),
    }
    if summary.capacity is not None:
        tables[SUMMARY_CAPACITY] = pa.Table.from_pandas(summary.capacity, preserve_index=False)
    # The loss curves (every step read back, each trial's moving average, the quartiles) and
    # their figure took half of the summary's time: a child draws them on another core while
    # this process draws the others (see forked.py).
    loss_curves_png = start_in_child(functools.partial(_loss_curves_png, location, summary))
    # matplotlib (a quarter of a second to import) only here, where figures are drawn: a study
    # imports it in the background while Ray starts (study/driver.py).
    from pipeline.summary.plots import png_bytes

    blobs = {name: png_bytes(figure) for name, figure in _figures(summary).items()}
    blobs[PLOTS["loss_curves"]] = loss_curves_png()
    blobs[SUMMARY_MD] = render_markdown(summary).encode()
    for name, table in tables.items():
        location.write_table(name, table)
    for name, data in blobs.items():
        location.write_bytes(name, data)
    return dataclasses.replace(summary, files=(*tables, SUMMARY_MD, *summary.plots))


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


def _read_config(output: Output) -> Config:
    if not output.exists():
        raise ConfigError(f"{output.location}: no such folder")
    config = read_config(output)
    if config is None:
        raise ConfigError(f"{output.location}: not an echo-study output (no config.yaml in it)")
    return config


def _schema(keys: Sequence[str]) -> pa.Schema:
    return pa.schema([(key, PARAM_TYPES[key]) for key in keys])


def _arrow_table(frame: pd.DataFrame, keys: pa.Schema) -> pa.Table:
    """The frame as a Parquet table: the keys' types, then STATISTICS; NaN becomes null."""
    schema = pa.schema([*keys, *STATISTICS.items()])
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def _loss_curves_png(location: Output, summary: Summary) -> bytes:
    from pipeline.summary.plots import loss_curves_figure, png_bytes  # see write_summary

    config, truncation = summary.config, summary.truncation
    curves = loss_curves(
        _steps(location), summary.trials, config.convergence.window, summary.factors
    )
    figure = loss_curves_figure(
        curves,
        threshold=config.convergence.threshold,
        window=config.convergence.window,
        truncation=truncation,
        epoch_steps=config.task.windows_per_epoch if truncation is not None else None,
        title=title(summary),
    )
    return png_bytes(figure)


def _figures(summary: Summary) -> dict[str, object]:
    """The summary's figures but the loss curves' (`_loss_curves_png`)."""
    from pipeline.summary.plots import (
        capacity_frontier_figure,
        converged_fraction_figure,
        steps_to_converge_figure,
        time_to_converge_figure,
        truncation_frontier_figure,
    )

    heading = title(summary)
    truncation = summary.truncation
    figures = {
        PLOTS["converged_fraction"]: converged_fraction_figure(
            group_table(
                summary.trials,
                ["num_layers" if truncation is not None else TRUNCATION, "echo_step"],
            ),
            truncation=truncation,
            title=heading,
        ),
        PLOTS["time_to_converge"]: time_to_converge_figure(summary.survival, title=heading),
    }
    if truncation is None:
        figures[PLOTS["truncation_frontier"]] = truncation_frontier_figure(
            summary.frontier, title=heading
        )
    else:
        figures[PLOTS["steps_to_converge"]] = steps_to_converge_figure(
            summary.table, truncation=truncation, title=heading
        )
    if summary.capacity is not None:
        figures[PLOTS["capacity_frontier"]] = capacity_frontier_figure(
            summary.capacity, truncation=truncation, title=heading
        )
    return figures


def _steps(output: Output) -> pd.DataFrame:
    """Every trial's losses, or none when no steps file was written (trials.parquet alone)."""
    try:
        return load_steps(output.location, columns=["trial", "step", "loss"])
    except FileNotFoundError:
        return pd.DataFrame({"trial": [], "step": [], "loss": []})
