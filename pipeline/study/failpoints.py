"""Fault injection for tests: `ECHO_STUDY_FAILPOINT=NAME:N` makes the driver SIGKILL itself the
N-th time it passes the failpoint NAME, a moment no outside timing can hit reliably (asked,
written, told, recovering)."""

from __future__ import annotations

import os
import signal
from collections import Counter

# Fault injection for tests: "NAME:N" makes the driver SIGKILL itself the N-th time it passes
# the failpoint NAME, a moment no outside timing can hit reliably (asked, written, told,
# recovering).
FAILPOINT = "ECHO_STUDY_FAILPOINT"


_passes: Counter[str] = Counter()


def failpoint(name: str) -> None:
    wanted, _, count = os.environ.get(FAILPOINT, "").partition(":")
    if wanted != name:
        return
    _passes[name] += 1
    if _passes[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
