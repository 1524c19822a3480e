"""Placement: which trainer takes a trial, and the order a grid is walked in.

The driver estimates each trainer's work left (`Workload`: per set of lanes, the cost of a
window times the windows its longest trial has left) and gives a trial to the trainer that
would then have the least, preferring one that already trains its architecture; a grid is
asked costliest first, so that it splits like a greedy partition and no trainer is left with
a long trial at the end.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pipeline.config import Config, ModelConfig
from pipeline.training.cost import COST_KEYS, lanes_window_cost

# A trainer that already trains a trial's architecture takes it unless another would then have
# more than this fraction less work left: the cost estimate is rough, and a set of lanes it
# steps anyway saves a step of its own.
PLACE_TOLERANCE = 0.05


def grid_points(config: Config) -> list[tuple]:
    """Every point of a grid study, costliest first (deep, wide, long trials), so that no
    trainer is left with a long trial at the end; the order never changes a trial's losses."""
    search = config.study.search
    points = list(itertools.product(*(p.choices for p in search)))
    # What a trial costs depends on few keys: a config is built once per distinct cost key.
    shaping = [i for i, p in enumerate(search) if p.key in COST_KEYS]

    @functools.cache
    def cost_of(values: tuple) -> float:
        trial = config.with_params({search[i].key: v for i, v in zip(shaping, values, strict=True)})
        return trial.total_steps * lanes_window_cost(trial.model, 1)

    return sorted(points, key=lambda point: cost_of(tuple(point[i] for i in shaping)), reverse=True)


class TrialWork(NamedTuple):
    """A trial as placement sees it."""

    lanes_key: tuple
    """Its `lanes_key`: the trials that share it share one set of lanes in a trainer."""
    model: ModelConfig
    windows: int
    """Windows it has left to train."""


@dataclass
class _Group:
    """One architecture's lanes on a trainer, as placement estimates them."""

    model: ModelConfig
    trials: int
    windows: int
    """Windows its lanes still step: its longest trial's windows left, as far as known."""

    def cost(self) -> float:
        return lanes_window_cost(self.model, self.trials) * self.windows


class Workload:
    """A trainer's work left, as the driver estimates it to place trials: for each architecture
    it trains, the cost of a window of its lanes (`cost.lanes_window_cost`) × the windows its
    longest trial has left. A trial's windows count down as its trainer reports windows
    stepped; a trial that leaves early (pruned) leaves its group's estimate as it was until the
    group empties."""

    def __init__(self) -> None:
        self.groups: dict[tuple, _Group] = {}

    @property
    def trials(self) -> int:
        return sum(group.trials for group in self.groups.values())

    def load(self, adding: TrialWork | None = None) -> float:
        """Work left, after adding the trial `adding` if given."""
        total = sum(group.cost() for group in self.groups.values())
        if adding is None:
            return total
        group = self.groups.get(adding.lanes_key)
        if group is None:
            return total + _Group(adding.model, 1, adding.windows).cost()
        grown = _Group(group.model, group.trials + 1, max(group.windows, adding.windows))
        return total - group.cost() + grown.cost()

    def add(self, trial: TrialWork) -> None:
        group = self.groups.setdefault(trial.lanes_key, _Group(trial.model, 0, 0))
        group.trials += 1
        group.windows = max(group.windows, trial.windows)

    def remove(self, lanes_key: tuple) -> None:
        group = self.groups[lanes_key]
        group.trials -= 1
        if group.trials == 0:
            del self.groups[lanes_key]

    def stepped(self, windows: dict[tuple, int]) -> None:
        """Count down the windows each architecture's lanes stepped."""
        for lanes_key, count in windows.items():
            if lanes_key in self.groups:
                group = self.groups[lanes_key]
                group.windows = max(0, group.windows - count)


def place(workloads: Sequence[Workload], trial: TrialWork) -> int:
    """The index of the trainer (by its workload) to place `trial` on.

    The trainer with the least work left after taking it, so that trainers end together: asked
    costliest first, a grid then splits like a greedy partition. A trainer that already trains
    the trial's architecture adds lanes to a set it steps anyway, and is preferred when it
    would have at most PLACE_TOLERANCE more than the least; so an architecture is split across
    trainers only when that evens out their work. Remaining ties go to the trainer with the
    fewest trials.
    """
    after = [workload.load(trial) for workload in workloads]
    least = min(after)

    def rank(i: int) -> tuple:
        near = after[i] <= least * (1 + PLACE_TOLERANCE)
        new_lanes = trial.lanes_key not in workloads[i].groups
        return (not near, new_lanes, after[i], workloads[i].trials)

    return min(range(len(workloads)), key=rank)
