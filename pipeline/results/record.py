"""Recording finished trials: their rows and steps, written together, the same for a study and
for the `train` command.

A trial's fate is data: its `status` (complete, pruned, diverged, error) decides Optuna's state
and what the summary counts; the error text is for people only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.results.metrics import objective_value, trial_metrics
from pipeline.results.output import Output
from pipeline.results.tables import steps_table, trial_row, write_steps


@dataclass(frozen=True)
class TrialResult:
    """What a finished trial brings to be recorded."""

    number: int
    config: Config
    """The trial's own config; train.seed is the seed it ran with."""
    param_values: Mapping[str, Any]
    """Its parameter columns by short name."""
    losses: np.ndarray
    status: str
    """complete, pruned, diverged or error."""
    error: str | None = None
    seconds: float | None = None
    pruned_value: float | None = None
    """For a pruned trial, the last value it reported (what Optuna records for it)."""


def record_trials(
    output: Output, results: Sequence[TrialResult], replace: bool = False
) -> list[dict[str, Any]]:
    """Write the steps of `results` as one file (rows in its footer) and return their rows of
    trials.parquet. The file appears whole or not at all, and never over another one unless
    `replace` (a `train` run, rerun into its own output, replaces its trial)."""
    rows = [trial_row_of(result) for result in results]
    tables = [
        steps_table(r.number, r.losses, r.config.task.windows_per_epoch, r.param_values)
        for r in results
    ]
    write_steps(output, tables, rows, replace)
    return rows


def trial_row_of(result: TrialResult) -> dict[str, Any]:
    """The trials.parquet row of a finished trial, its metrics derived from its losses."""
    config = result.config
    metrics = trial_metrics(result.losses, config.task.windows_per_epoch, config.convergence)
    value = None
    if result.status == "complete":
        value = objective_value(metrics, config.study.objective)
    elif result.status == "pruned":
        value = result.pruned_value
    error = result.error
    if result.status == "diverged":
        error = f"diverged at step {len(result.losses) - 1}"
    return trial_row(
        trial=result.number,
        status=result.status,
        params=result.param_values,
        value=value,
        metrics=metrics,
        steps=len(result.losses),
        duration_s=result.seconds,
        error=error,
        trial_seed=config.train.seed,
    )
