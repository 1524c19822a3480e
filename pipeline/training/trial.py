"""What a set of lanes takes and gives: the trials to train, what became of them, and which
trials may share a trainer's lanes (`lanes_key`). The study's driver and its trainers hand
these to each other.

These are plain values, apart from the engine that trains them (lanes.py), so that the
driver, which never trains, never imports torch: its import took most of a second of a short
study's start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.config import SHARED, Config, keys_of_scope

Status = Literal["complete", "pruned", "diverged"]


@dataclass(frozen=True)
class LaneTrial:
    """A trial as a lane trains it."""

    key: int
    """The trial's number in its study (its index in `train`)."""
    config: Config
    """Its own config: its parameters, and in train.seed the seed it runs with."""
    attempt: int = 0
    """How often it ran before, on trainers that were lost (0 the first time)."""


@dataclass(frozen=True)
class Finished:
    """A trial that left its lane."""

    key: int
    losses: np.ndarray
    """float32 loss of every step it ran (a diverged trial's last one is not finite)."""
    status: Status
    seconds: float
    """Wall time from entering its lane to leaving it."""


@dataclass(frozen=True)
class Report:
    """A trial's mean loss over its last `report_every` steps, for a pruner."""

    key: int
    step: int
    """The (0-based) step the report ends at."""
    value: float


def lanes_key(config: Config) -> tuple:
    """What the trials in one trainer's lanes must share: the keys that fix tensor shapes and
    data layout (the SHARED scope of config fields), and the device and kernels they run on."""
    shared = tuple(config.value(key) for key in keys_of_scope(SHARED))
    return (*shared, config.train.device, config.train.compile)
