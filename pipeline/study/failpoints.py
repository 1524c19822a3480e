"""Fault injection for tests: `ECHO_STUDY_FAILPOINT=NAME:N` makes the driver SIGKILL itself the
N-th time it passes the failpoint NAME, a moment no outside timing can hit reliably (asked,
written, told, recovering). `ECHO_TRAINER_BREAK` breaks trainers (`trainer_breaks`)."""

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


# "all": every trainer's training thread raises as it starts, as one whose machinery cannot
# train (a kernel cache it cannot read, a broken GPU); a file path: only the first trainer to
# create that file does. Read by the trainers, in their Ray workers.
TRAINER_BREAK = "ECHO_TRAINER_BREAK"


def trainer_breaks() -> bool:
    """Whether this trainer is to break (see TRAINER_BREAK)."""
    wanted = os.environ.get(TRAINER_BREAK, "")
    if wanted in ("", "all"):
        return wanted == "all"
    try:
        os.close(os.open(wanted, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
