"""Fault injection for tests: `ECHO_STUDY_FAILPOINT=NAME:N` makes the driver SIGKILL itself the
N-th time it passes the failpoint NAME, a moment no outside timing can hit reliably (asked,
written, told, recovering). `NAME:N:stop` makes it SIGSTOP itself there instead: the study's
processes stand still, as they are at that moment, for a test to look at until it sends
SIGCONT."""

from __future__ import annotations

import os
import signal
from collections import Counter

FAILPOINT = "ECHO_STUDY_FAILPOINT"
SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}

_passes: Counter[str] = Counter()


def failpoint(name: str) -> None:
    wanted, _, rest = os.environ.get(FAILPOINT, "").partition(":")
    if wanted != name:
        return
    count, _, action = rest.partition(":")
    _passes[name] += 1
    if _passes[name] == int(count or 1):
        os.kill(os.getpid(), SIGNALS[action or "kill"])
