"""What one trial's losses say: its final and mean loss, the step it converged at, and the
value Optuna is told. Recorded in trials.parquet, and summarized per group by the summary."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import ConvergenceConfig


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
