"""Formatting shared by the benchmark scripts: ratios, tables, and progress kept off stdout."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def times(ratio: float) -> str:
    """A ratio with the digits that matter: 0.26×, 3.1×, 14.8×, 105× (one decimal up to 100,
    so that a ratio just short of a goal never prints as the goal)."""
    if ratio < 1:
        return f"{ratio:.2f}×"
    return f"{ratio:.1f}×" if ratio < 100 else f"{ratio:.0f}×"


def say(message: str) -> None:
    """Progress goes to stderr, so that stdout holds only the result."""
    print(message, file=sys.stderr, flush=True)


def table(header: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> list[str]:
    """A Markdown table, its first `left` columns aligned left and the rest (numbers) right."""
    rule = ["---" if i < left else "---:" for i in range(len(header))]
    return [f"| {' | '.join(str(cell) for cell in line)} |" for line in [header, rule, *rows]]


def machine() -> str:
    """The cores and how busy they were at the start: other work skews every number."""
    return f"{os.cpu_count()} CPUs, 1-minute load average {os.getloadavg()[0]:.1f} at the start"
