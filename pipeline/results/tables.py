"""The Parquet tables of a study: steps/ (a row per trial and step, a file per group of trials
recorded together) and trials.parquet (a row per trial), their columns and types, and reading
them back as pandas frames (`load_steps`, `load_trials`).

Step rows carry the trial number and its searched parameters, so pandas needs no join; each
steps file's footer holds its trials' rows, so a driver that restarts finds what was recorded
without trials.parquet.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import Config, ConfigError
from pipeline.results.output import STEPS, TRIALS, Output

# Where each steps file keeps its trials' rows, so that steps/ alone can rebuild trials.
TRIALS_METADATA_KEY = b"echo_study.trials"


OLD_TRIAL_METADATA_KEY = b"echo_study.trial"  # one trial per file, before trials had a status


STEP_COLUMNS = {
    "trial": pa.int32(),
    "epoch": pa.int16(),
    "window": pa.int32(),
    "step": pa.int32(),
    "loss": pa.float32(),
}


# Parameter columns every trial's rows carry, searched or not: the factors the summary groups
# by, and the learning rate. Searched keys add their own columns.
FIXED_COLUMNS = {
    "num_layers": "model.num_layers",
    "state_size": "model.state_size",
    "echo_step": "task.echo_step",
    "lr": "train.lr",
}


# Parameter columns by short name, as compact as their ranges allow.
PARAM_TYPES = {
    "num_layers": pa.int16(),
    "state_size": pa.int16(),
    "echo_step": pa.int32(),
    "lr": pa.float64(),
    "seed": pa.int64(),
    "epochs": pa.int16(),
    "series_length": pa.int32(),
    "batch_size": pa.int32(),
    "truncation": pa.int32(),
    "carry_state": pa.bool_(),
}


# A trial's fate as data: Optuna's state, and why it ended (a diverged loss and an error are
# both FAIL to Optuna, but only one of them says something about convergence).
TRIAL_STATES = ("COMPLETE", "PRUNED", "FAIL")


STATUSES = ("complete", "pruned", "diverged", "error")


STATE_OF_STATUS = {"complete": "COMPLETE", "pruned": "PRUNED", "diverged": "FAIL", "error": "FAIL"}


TRIAL_COLUMNS = {
    "trial": pa.int32(),
    "state": pa.string(),
    "status": pa.string(),
    "value": pa.float64(),
    "final_loss": pa.float32(),
    "mean_loss": pa.float32(),
    "steps_to_converge": pa.int32(),
    "converged": pa.bool_(),
    "steps": pa.int32(),
    "duration_s": pa.float32(),
    "error": pa.string(),
    "trial_seed": pa.int64(),
}


def steps_file(trials: Sequence[int]) -> str:
    """The name of the steps file of trials recorded together: unique, since a trial number
    is recorded once, and sorted by trial."""
    return f"{STEPS}/trials-{min(trials):07d}-{len(trials)}.parquet"


def steps_table(
    trial: int, losses: np.ndarray, windows_per_epoch: int, params: Mapping[str, Any]
) -> pa.Table:
    """One trial's steps: trial, epoch, window, step, loss and its parameters by short name."""
    step = np.arange(len(losses), dtype=np.int32)
    columns = {
        "trial": np.full(len(losses), trial, np.int32),
        "epoch": (step // windows_per_epoch).astype(np.int16),
        "window": (step % windows_per_epoch).astype(np.int32),
        "step": step,
        "loss": np.asarray(losses, np.float32),
    }
    arrays = [pa.array(values, STEP_COLUMNS[name]) for name, values in columns.items()]
    names = list(columns)
    for name, value in params.items():
        arrays.append(pa.array(np.full(len(losses), value), PARAM_TYPES[name]))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def write_steps(
    output: Output, tables: Sequence[pa.Table], rows: Sequence[dict], replace: bool = False
) -> None:
    """Write the steps of trials recorded together as one file, their rows in its footer, so
    that steps/ alone can rebuild trials.parquet. A steps file is never overwritten, unless
    `replace`: one of the same name raises FileExistsError."""
    metadata = {TRIALS_METADATA_KEY: json.dumps(list(rows)).encode()}
    table = pa.concat_tables(tables).replace_schema_metadata(metadata)
    output.write_table(steps_file([row["trial"] for row in rows]), table, replace=replace)


def trial_row(
    *,
    trial: int,
    status: str,
    params: Mapping[str, Any],
    value: float | None,
    metrics: Any,
    steps: int,
    duration_s: float | None,
    error: str | None,
    trial_seed: int,
) -> dict[str, Any]:
    """One row of trials.parquet; `metrics` is a summary.TrialMetrics."""
    return {
        "trial": trial,
        "state": STATE_OF_STATUS[status],
        "status": status,
        **params,
        "value": value,
        "final_loss": metrics.final_loss,
        "mean_loss": metrics.mean_loss,
        "steps_to_converge": metrics.steps_to_converge,
        "converged": metrics.converged,
        "steps": steps,
        "duration_s": duration_s,
        "error": error,
        "trial_seed": trial_seed,
    }


def trials_table(rows: Sequence[Mapping[str, Any]], param_names: Sequence[str]) -> pa.Table:
    """One row per trial, parameters after `status`; missing metrics are null."""
    leading = ("trial", "state", "status")
    schema = pa.schema(
        [(name, TRIAL_COLUMNS[name]) for name in leading]
        + [(name, PARAM_TYPES[name]) for name in param_names]
        + [(name, kind) for name, kind in TRIAL_COLUMNS.items() if name not in leading]
    )
    return pa.Table.from_pylist([dict(row) for row in rows], schema=schema)


def read_steps_outcomes(output: Output) -> dict[int, dict[str, Any]]:
    """The row recorded for every trial in the steps files, by trial number (reads only the
    footers). A file that is not readable Parquet is refused in one line."""
    outcomes = {}
    for info in _steps_files(output):
        try:
            metadata = pq.read_schema(info.path, filesystem=output.fs).metadata or {}
        except (pa.ArrowInvalid, OSError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(
                f"{info.path}: not a readable Parquet file ({message}); move it away"
            ) from None
        if TRIALS_METADATA_KEY not in metadata and OLD_TRIAL_METADATA_KEY in metadata:
            raise ConfigError(
                f"{info.path}: written by an older echo-study (one file per trial, no trial "
                "status); summarize or resume it with that version, or run into a new --output"
            )
        for row in json.loads(metadata.get(TRIALS_METADATA_KEY, b"[]")):
            outcomes[row["trial"]] = row
    return outcomes


def _steps_files(output: Output) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(output.path(STEPS), allow_not_found=True)
    infos = output.fs.get_file_info(selector)
    return sorted(
        (i for i in infos if i.base_name.endswith(".parquet") and not i.base_name.startswith(".")),
        key=lambda i: i.base_name,
    )


def load_steps(output: str, columns: Sequence[str] | None = None, **filters: Any) -> pd.DataFrame:
    """Every step of every finished trial as a DataFrame, filtered in pyarrow before pandas.

    `columns` selects columns (default: all). A filter is a column name and a value, or a list
    of accepted values: `load_steps("results/echo-grid", echo_step=[3, 9], num_layers=2)`.
    Rows come sorted by trial and step (when those columns are selected). An unknown column
    raises ValueError; a folder without steps files raises FileNotFoundError.
    """
    location = Output(output)
    files = [info.path for info in _steps_files(location)]
    if not files:
        raise FileNotFoundError(f"{location.path(STEPS)}: no steps files (no finished trial)")
    dataset = ds.dataset(files, filesystem=location.fs, format="parquet")
    names = dataset.schema.names
    unknown = [name for name in [*(columns or []), *filters] if name not in names]
    if unknown:
        raise ValueError(f"no column {unknown[0]!r} in steps; columns: {', '.join(names)}")
    expression = None
    for name, wanted in filters.items():
        scalar = isinstance(wanted, str | bytes) or not isinstance(wanted, Iterable)
        term = ds.field(name).isin([wanted] if scalar else list(wanted))
        expression = term if expression is None else expression & term
    table = dataset.to_table(columns=list(columns) if columns else None, filter=expression)
    order = [name for name in ("trial", "step") if name in table.column_names]
    frame = table.to_pandas()
    return frame.sort_values(order, ignore_index=True) if order else frame


def load_trials(output: str) -> pd.DataFrame:
    """trials.parquet as a DataFrame: one row per trial with its parameters and metrics."""
    location = Output(output)
    with location.fs.open_input_file(location.path(TRIALS)) as file:
        return pq.read_table(file).to_pandas()


def param_columns(config: Config) -> list[str]:
    """The parameter columns of a study's Parquet files, in order."""
    searched = [p.short_name for p in config.study.search if p.short_name not in FIXED_COLUMNS]
    return [*FIXED_COLUMNS, *searched]
