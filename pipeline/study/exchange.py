"""What a trainer tells the driver in one exchange (the trials' values live in
training/trial.py, which the trainers' lanes use)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.training.trial import Finished, Report


@dataclass(frozen=True)
class TrainerEvents:
    """What a trainer tells the driver in one exchange."""

    finished: list[Finished]
    reports: list[Report]
    errors: list[tuple[int, str]]
    """Trials that raised (trial, one-line error): they are FAIL, the trainer goes on."""
    windows: dict[tuple, int] = field(default_factory=dict)
    """Windows each architecture's lanes stepped (training every running lane at once)."""
    lane_windows: int = 0
    side_by_side: int = 0
    """Of `windows`, those stepped on threads of CPUs lent to this trainer (`Trainer.lend`),
    beside other architectures' lanes."""
    turns: int = 0
    """Turns the trainer's thread took (each steps every running lane once): none while
    every lane it holds waits for a verdict."""
    broken: str | None = None
    """Why this trainer cannot train any more (its training thread died, an error of its own
    machinery rather than of a trial's training): the driver gives it up and runs its trials
    elsewhere, as for a lost worker."""
