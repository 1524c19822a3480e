"""Time to converge as censored data: Kaplan–Meier per group, Greenwood's variance, Wilson
intervals at the effective sample size, and the Brookmeyer–Crowley interval of the median.

A trial that stopped before converging (pruned, diverged or out of steps) is censored at its
last step: it tells that convergence took longer than that, not that it never comes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

# The normal quantile of a two-sided 95 % interval.
Z95 = 1.959963984540054
# Fractions this close are equal: Kaplan–Meier products of ratios are not exact.
TOLERANCE = 1e-9


def wilson_interval(fraction: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a binomial fraction observed in `n` trials (n may be an
    effective, fractional size); NaN for n = 0. It always contains `fraction`."""
    if not n > 0 or np.isnan(fraction):
        return float("nan"), float("nan")
    scale = 1 + z * z / n
    centre = (fraction + z * z / (2 * n)) / scale
    half = z * np.sqrt(fraction * (1 - fraction) / n + z * z / (4 * n * n)) / scale
    # Rounding must not push an end past the estimate (at 0 and 1 they coincide).
    return float(min(max(centre - half, 0.0), fraction)), float(
        max(min(centre + half, 1.0), fraction)
    )


@dataclass(frozen=True)
class Survival:
    """The Kaplan–Meier fraction converged of a set of trials, a step function of the step.

    Arrays are over the distinct steps at which some trial converged, ascending.
    """

    steps: np.ndarray
    """Steps at which at least one trial converged."""
    fraction: np.ndarray
    """Estimated fraction converged by each of those steps."""
    low: np.ndarray
    """Pointwise 95 % Wilson interval of `fraction`, at Greenwood's effective sample size."""
    high: np.ndarray
    censored: np.ndarray
    """Steps at which trials were censored (never seen to converge), one per trial."""
    horizon: int
    """The last step any trial was followed to; -1 for no trial."""
    trials: int

    def fraction_by(self, step: float) -> float:
        """Estimated fraction converged by `step`."""
        index = np.searchsorted(self.steps, step, side="right")
        return float(self.fraction[index - 1]) if index else 0.0

    @property
    def final(self) -> float:
        """The fraction converged by the horizon; NaN for no trial."""
        return self.fraction_by(self.horizon) if self.trials else float("nan")

    @property
    def final_interval(self) -> tuple[float, float]:
        if not self.trials:
            return float("nan"), float("nan")
        if not self.steps.size:
            return wilson_interval(0.0, self.trials)
        return float(self.low[-1]), float(self.high[-1])

    def quantile(self, p: float) -> float:
        """The first step by which a fraction p converged; NaN if it never did. Where the
        fraction equals p exactly up to the next convergence, the midpoint of the two steps,
        so that with no censoring the median is the ordinary sample median."""
        reached = np.flatnonzero(self.fraction >= p - TOLERANCE)
        if not reached.size:
            return float("nan")
        k = reached[0]
        if abs(self.fraction[k] - p) < TOLERANCE and k + 1 < len(self.steps):
            return float(self.steps[k] + self.steps[k + 1]) / 2
        return float(self.steps[k])

    def median_interval(self) -> tuple[float, float]:
        """95 % interval of the median steps to converge, read off the pointwise band: from
        the first step where the band's upper end reaches one half to the first where its
        lower end does (Brookmeyer and Crowley's construction); an end never reached is NaN
        (read: beyond the horizon). Chosen over a bootstrap because it uses the censored
        trials as the estimate does, is deterministic and costs one pass."""
        return _first_step_at(self.steps, self.high, 0.5), _first_step_at(self.steps, self.low, 0.5)


def kaplan_meier(steps: np.ndarray, converged: np.ndarray, horizon: int | None = None) -> Survival:
    """The Kaplan–Meier fraction converged of trials that converged at `steps` where
    `converged`, and were censored there otherwise. At a tied step, convergences count first:
    a trial censored at step s was at risk of converging at s. `horizon`: the last step the
    trials ran to (default: the largest of `steps`)."""
    steps = np.asarray(steps, np.int64)
    converged = np.asarray(converged, bool)
    trials = len(steps)
    order = np.lexsort((~converged, steps))
    steps, converged = steps[order], converged[order]
    distinct, first = np.unique(steps, return_index=True)
    at_risk = trials - first
    events = np.add.reduceat(converged.astype(np.int64), first) if trials else first
    keep = events > 0
    distinct, at_risk, events = distinct[keep], at_risk[keep], events[keep]
    survival = np.cumprod(1.0 - events / at_risk)
    with np.errstate(divide="ignore", invalid="ignore"):
        greenwood = survival**2 * np.cumsum(events / (at_risk * (at_risk - events)))
        effective = np.where(
            (greenwood > 0) & np.isfinite(greenwood),
            survival * (1 - survival) / greenwood,
            float(trials),
        )
    fraction = 1.0 - survival
    bands = [wilson_interval(f, min(n, trials)) for f, n in zip(fraction, effective, strict=True)]
    low, high = (np.array(end, float) for end in zip(*bands, strict=True)) if bands else ([], [])
    return Survival(
        steps=distinct,
        fraction=fraction,
        low=np.asarray(low, float),
        high=np.asarray(high, float),
        censored=steps[~converged],
        horizon=(int(steps.max()) if horizon is None else int(horizon)) if trials else -1,
        trials=trials,
    )


def _first_step_at(steps: np.ndarray, fractions: np.ndarray, p: float) -> float:
    reached = np.flatnonzero(fractions >= p - TOLERANCE)
    return float(steps[reached[0]]) if reached.size else float("nan")


def median_bounds(row: pd.Series) -> tuple[float, float]:
    """A group's 95 % interval of the median as numbers: an end never reached lies beyond
    the horizon (a lower end) or at infinity (an upper end)."""
    low, high = row["median_steps_to_converge_low"], row["median_steps_to_converge_high"]
    beyond = row["horizon_step"] + 1 if pd.notna(row["horizon_step"]) else np.inf
    return (beyond if pd.isna(low) else low), (np.inf if pd.isna(high) else high)
