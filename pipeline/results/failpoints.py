"""Fault injection for tests, at moments no outside timing can hit reliably.

`ECHO_STUDY_FAILPOINT=NAME:N` makes the process SIGKILL itself the N-th time it passes the
failpoint NAME: the driver's (asked, written, told, recovering) and the results writer's
("writing steps": an object-store write handed all its bytes, its object not yet closed);
`NAME:N:stop` makes it SIGSTOP itself there instead, holding what it holds (the output's lock)
until the test sends SIGCONT. They live here, below the study, so that the results' writer can
hold failpoints too.

`ECHO_STUDY_TRAINER_FAILPOINT=trial:T:windows:N` makes the trainer that trains trial T for the
first time SIGKILL its own Ray worker once that trial has run N windows: a trainer lost in the
middle of its trials. The driver reads it and hands it to the trainers it starts; a trial run
again after the loss runs to its end.

`ECHO_TRAINER_BREAK` breaks trainers as they start (`trainer_breaks`).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from dataclasses import dataclass

FAILPOINT = "ECHO_STUDY_FAILPOINT"
TRAINER_FAILPOINT = "ECHO_STUDY_TRAINER_FAILPOINT"


_passes: Counter[str] = Counter()


def failpoint(name: str) -> None:
    """SIGKILL (or SIGSTOP) this process the N-th time it passes `name`, as FAILPOINT says."""
    wanted, _, rest = os.environ.get(FAILPOINT, "").partition(":")
    if wanted != name:
        return
    count, _, action = rest.partition(":")
    _passes[name] += 1
    if _passes[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)


@dataclass(frozen=True)
class TrainerFailpoint:
    """Kill the trainer of trial `trial`'s first attempt after `windows` of its windows."""

    trial: int
    windows: int


def trainer_failpoint() -> TrainerFailpoint | None:
    """The TRAINER_FAILPOINT of this process's environment, if set."""
    text = os.environ.get(TRAINER_FAILPOINT)
    if not text:
        return None
    trial_word, trial, windows_word, windows = text.split(":")
    if (trial_word, windows_word) != ("trial", "windows"):
        raise ValueError(f"{TRAINER_FAILPOINT}={text!r}: expected trial:T:windows:N")
    return TrainerFailpoint(int(trial), int(windows))


def die() -> None:
    """SIGKILL this process: no handler, no cleanup, as a crash or the OOM killer would."""
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
