"""The driver's records of the trials it asked and of the trainer actors it placed them on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.study.placement import TrialWork, Workload
from pipeline.training.trial import lanes_key


@dataclass(frozen=True)
class PlannedTrial:
    """A trial asked of Optuna, with everything its trainer needs."""

    number: int
    config: Config
    """The study's config with the trial's parameters and its own seed in train.seed."""
    param_values: dict[str, Any]
    """Its parameter values by short name: the parameter columns of its Parquet rows."""
    point: tuple
    """Its searched values in search order: what identifies a grid point."""


@dataclass
class TrainerRecord:
    """The driver's view of one trainer actor."""

    actor: Any
    started: float
    trials: dict[int, PlannedTrial] = field(default_factory=dict)
    """Trials placed on it and not finished."""
    inbox: list[PlannedTrial] = field(default_factory=list)
    """Trials to admit with the next exchange."""
    verdicts: dict[int, bool] = field(default_factory=dict)
    """Pruner verdicts to send with the next exchange: trial → prune."""
    call: Any = None
    """The exchange in flight, if any."""
    answered: bool = False
    work: Workload = field(default_factory=Workload)
    """The estimated work left in its trials."""
    lent: int = 0
    """CPUs of idle trainers it may use (`_Driver._lend`)."""
    noticed: bool = False
    """Whether the user was told that it waits for Ray to place it."""

    def take(self, planned: PlannedTrial, work: TrialWork) -> None:
        self.trials[planned.number] = planned
        self.inbox.append(planned)
        self.work.add(work)

    def release(self, number: int) -> PlannedTrial:
        planned = self.trials.pop(number)
        self.work.remove(lanes_key(planned.config))
        return planned


@dataclass(frozen=True)
class Phases:
    """Where the wall time of a `run_study` call went. Only `trials` is split between trainers:
    the other two take as long on one CPU as on many, and bound what more trainers can gain."""

    setup: float
    """From the call to the driver's loop: the checks, Ray's start (or joining a cluster), the
    study's storage, a resumed study's recovery."""
    trials: float
    """The driver's loop: the trainers' start, the training, the last trials' records."""
    summary: float
    """Writing the summary (0 when no trial finished)."""


@dataclass(frozen=True)
class StudyOutcome:
    """What a `run_study` call achieved."""

    counts: dict[str, int]
    """Finished trials of the study by state (COMPLETE, PRUNED, FAIL), this run and earlier."""
    ran: int
    """Trials finished by this run."""
    best_value: float | None
    best_params: dict[str, Any] | None
    seconds: float
    phases: Phases
    driver_cpu_seconds: float
    """CPU time this process (the driver) spent, Ray's own processes not included."""
    windows_stepped: int
    """Window steps the trainers ran in this run (each trains every running lane at once)."""
    lane_windows: int
    """Windows trained summed over lanes: the trials' steps, counting those run again."""
    run_again: int = 0
    """Times a trial was placed again because its trainer was lost (ray.max_retries)."""
    side_by_side: int = 0
    """Of `windows_stepped`, those stepped beside another architecture's on a CPU that an idle
    trainer lent (`_Driver._lend`: at a study's end, with Ray embedded)."""
