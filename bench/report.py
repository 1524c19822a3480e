"""Formatting shared by the benchmark scripts: ratios, and progress kept off stdout."""

from __future__ import annotations

import sys


def times(ratio: float) -> str:
    """A ratio with the digits that matter: 0.26×, 3.1×, 57×."""
    if ratio < 1:
        return f"{ratio:.2f}×"
    return f"{ratio:.1f}×" if ratio < 10 else f"{ratio:.0f}×"


def say(message: str) -> None:
    """Progress goes to stderr, so that stdout holds only the result."""
    print(message, file=sys.stderr, flush=True)
