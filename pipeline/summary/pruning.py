"""Pruning's bias in words. A pruner stops trials because they looked bad, so the Kaplan–Meier
fraction, which censors a pruned trial (lets it converge as often as those followed on), is an
upper estimate, and the fraction with pruned trials counted as never converging
(`converged_fraction_pruned_never`, groups.py) a lower one."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd

# Fractions this close are equal: Kaplan–Meier products of ratios are not exact.
_TOLERANCE = 1e-9

PRUNED_READING = (
    "A pruner stops trials because they looked bad, so Kaplan–Meier, which lets a pruned trial "
    "converge as often as those followed on, gives an upper estimate; `pruned as never "
    "converged` counts each pruned trial that had not converged as a failure, a lower one. The "
    "truth lies between them."
)


def pruning_finding(table: pd.DataFrame, name: Callable[[dict], str]) -> str | None:
    """The finding on pruning's bias, None when no trial was pruned: where counting pruned
    trials as never converging, rather than censoring them, decides whether a majority
    converged. `name` words a group's row."""
    pruned = table[table["pruned"] > 0]
    if pruned.empty:
        return None
    upper, lower = pruned["converged_fraction"], pruned["converged_fraction_pruned_never"]
    changed = pruned[(upper > 0.5 + _TOLERANCE) & (lower <= 0.5 + _TOLERANCE)]
    groups = f"of the {len(pruned)} groups with pruned trials"
    if changed.empty:
        return (
            f"Pruning's bias changes no conclusion: in each {groups}, the converged fraction "
            f"with pruned trials counted as never converging (down by up to "
            f"{(upper - lower).max():.0%}) is on the same side of one half as Kaplan–Meier's."
        )
    cells = [
        f"{name(row)} ({row['converged_fraction']:.0%} against "
        f"{row['converged_fraction_pruned_never']:.0%})"
        for row in changed.to_dict("records")
    ]
    return (
        f"Pruning decides whether a majority converged in {len(changed)} {groups}: a majority "
        f"by Kaplan–Meier (pruned trials censored) but not with pruned trials counted as never "
        f"converging, at {_and(cells)}; the truth lies between the two."
    )


def _and(parts: Sequence[str]) -> str:
    parts = list(parts)
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
