"""Fault injection for tests: `ECHO_STUDY_FAILPOINT=NAME:N` makes the process SIGKILL itself the
N-th time it passes the failpoint NAME, a moment no outside timing can hit reliably: the
driver's (asked, written, told, recovering) and the writer's ("writing steps": an object-store
write handed all its bytes, its object not yet closed). Here, below the study, so that the
results' writer can hold failpoints too."""

from __future__ import annotations

import os
import signal
from collections import Counter

FAILPOINT = "ECHO_STUDY_FAILPOINT"


_passes: Counter[str] = Counter()


def failpoint(name: str) -> None:
    """SIGKILL this process if ECHO_STUDY_FAILPOINT names `name` and this is its N-th pass."""
    wanted, _, count = os.environ.get(FAILPOINT, "").rpartition(":")
    if not wanted:  # no count given: "NAME" alone
        wanted, count = count, ""
    if wanted != name:
        return
    _passes[name] += 1
    if _passes[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
