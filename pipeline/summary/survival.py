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
Z95 = 1.959963984540054  # scipy.special.ndtri(0.975), without importing SciPy
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
    variance: np.ndarray
    """Greenwood's variance of `fraction`; NaN where no trial is left unconverged."""
    effective: np.ndarray
    """The effective sample size of `fraction`: see `effective_sizes`."""
    low: np.ndarray
    """Pointwise 95 % Wilson interval of `fraction`, at the effective sample size."""
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
        """The 95 % interval of `final`. With no trial converged the estimate 0 rests on the
        trials followed to the last censoring step, not on all trials (a pruned one stopped
        early): Wilson's interval of 0 at that many."""
        if not self.trials:
            return float("nan"), float("nan")
        if not self.steps.size:
            return wilson_interval(0.0, self.at_risk_before_first(int(self.censored.max())))
        return float(self.low[-1]), float(self.high[-1])

    def at_risk_before_first(self, step: int) -> int:
        """Trials still followed at `step`, at or before the first convergence: those not
        censored before it."""
        return int(self.trials - np.count_nonzero(self.censored < step))

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
        lower end does (Brookmeyer and Crowley's construction); an upper end never reached is
        NaN (read: beyond the horizon), and so is a lower end, which then lies beyond it too.
        Chosen over a bootstrap because it uses the censored trials as the estimate does, is
        deterministic and costs one pass.

        Before the first convergence the band is Wilson's interval of 0 at the trials still
        followed, whose upper end z² / (n + z²) reaches one half once n ≤ z² ≈ 3.84: with 3
        trials or fewer at risk, from step 0 (the median is bounded below by nothing), or from
        the step after the censoring that leaves that few."""
        return self._median_low(), _first_step_at(self.steps, self.low, 0.5)

    def _median_low(self) -> float:
        first = self.steps[0] if self.steps.size else np.inf
        for step in (0, *np.unique(self.censored + 1)):
            if step >= first:
                break
            if wilson_interval(0.0, self.at_risk_before_first(step))[1] >= 0.5 - TOLERANCE:
                return float(step)
        return _first_step_at(self.steps, self.high, 0.5)


def kaplan_meier(steps: np.ndarray, converged: np.ndarray, horizon: int | None = None) -> Survival:
    """The Kaplan–Meier fraction converged of trials that converged at `steps` where
    `converged`, and were censored there otherwise; SciPy's estimate (scipy.stats.ecdf). At a
    tied step, convergences count first: a trial censored at step s was at risk of converging
    at s. `horizon`: the last step the trials ran to (default: the largest of `steps`)."""
    steps = np.asarray(steps, np.int64)
    converged = np.asarray(converged, bool)
    trials = len(steps)
    distinct, fraction = _scipy_fraction(steps, converged)
    at_risk = trials - np.searchsorted(np.sort(steps), distinct, side="left")
    events = np.array([np.count_nonzero(converged & (steps == s)) for s in distinct], np.int64)
    keep = events > 0
    distinct, fraction = distinct[keep], fraction[keep]
    variance, effective = effective_sizes(1.0 - fraction, at_risk[keep], events[keep])
    bands = [wilson_interval(f, min(n, trials)) for f, n in zip(fraction, effective, strict=True)]
    low, high = (np.array(end, float) for end in zip(*bands, strict=True)) if bands else ([], [])
    return Survival(
        steps=distinct,
        fraction=fraction,
        variance=variance,
        effective=effective,
        low=np.asarray(low, float),
        high=np.asarray(high, float),
        censored=steps[~converged],
        horizon=(int(steps.max()) if horizon is None else int(horizon)) if trials else -1,
        trials=trials,
    )


def effective_sizes(
    survivors: np.ndarray, at_risk: np.ndarray, events: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Greenwood's variance S² Σ d / (n (n − d)) of a Kaplan–Meier curve at its event steps
    (S: the fraction not converged, n: trials at risk, d: converged there), and the effective
    sample size S (1 − S) / variance, which is the number of trials when none was censored.

    Where the last trials at risk all converge, S = 0 and the variance is undefined (NaN); the
    effective size is then its limit as d approaches n, n / S just before: the trials followed
    to that step, scaled up by the fraction they stand for (with no censoring, all trials)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = events / (at_risk * (at_risk - events))
        variance = np.where(survivors > 0, survivors**2 * np.cumsum(terms), np.nan)
        before = np.concatenate([[1.0], survivors[:-1]])
        effective = np.where(
            survivors > 0, survivors * (1 - survivors) / variance, at_risk / before
        )
    return variance, effective


def _scipy_fraction(steps: np.ndarray, converged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SciPy's Kaplan–Meier fraction converged at each distinct step of `steps`."""
    if not steps.size:
        return np.zeros(0, np.int64), np.zeros(0)
    from scipy.stats import CensoredData, ecdf  # a second to import: only when summarizing

    curve = ecdf(CensoredData(uncensored=steps[converged], right=steps[~converged])).cdf
    return curve.quantiles.astype(np.int64), np.asarray(curve.probabilities, float)


def _first_step_at(steps: np.ndarray, fractions: np.ndarray, p: float) -> float:
    reached = np.flatnonzero(fractions >= p - TOLERANCE)
    return float(steps[reached[0]]) if reached.size else float("nan")


def median_bounds(row: pd.Series) -> tuple[float, float]:
    """A group's 95 % interval of the median as numbers: an end never reached lies beyond
    the horizon (a lower end) or at infinity (an upper end)."""
    low, high = row["median_steps_to_converge_low"], row["median_steps_to_converge_high"]
    beyond = row["horizon_step"] + 1 if pd.notna(row["horizon_step"]) else np.inf
    return (beyond if pd.isna(low) else low), (np.inf if pd.isna(high) else high)
