"""Placement: which trainer takes a trial, and the order a grid is walked in.

The driver estimates each trainer's work left (`Workload`: per set of lanes, the cost of a
window times the windows its longest trial has left) and gives a trial to the trainer that
would then have the least, preferring one that already trains its architecture; a grid is
asked costliest first, so that it splits like a greedy partition and no trainer is left with
a long trial at the end. The trials of one architecture queued in a row go to one trainer
whole (`place_run`): a set of lanes pays its window's overhead however few models it steps,
so two trainers that split an architecture do more work than one that keeps it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterable, Sequence
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


@dataclasses.dataclass
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

    def load(self, *adding: TrialWork) -> float:
        """Work left, after adding the trials `adding` if any."""
        total = sum(group.cost() for group in self.groups.values())
        grown: dict[tuple, _Group] = {}
        for trial in adding:
            if trial.lanes_key not in grown:
                group = self.groups.get(trial.lanes_key)
                grown[trial.lanes_key] = (
                    dataclasses.replace(group) if group else _Group(trial.model, 0, 0)
                )
            group = grown[trial.lanes_key]
            group.trials += 1
            group.windows = max(group.windows, trial.windows)
        for key, group in grown.items():
            total += group.cost() - (self.groups[key].cost() if key in self.groups else 0)
        return total

    def copy(self) -> Workload:
        """A copy to place trials on ahead, this one unchanged."""
        copied = Workload()
        copied.groups = {key: dataclasses.replace(group) for key, group in self.groups.items()}
        return copied

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


def place(workloads: Sequence[Workload], *trials: TrialWork) -> int:
    """The index of the trainer (by its workload) to place `trials` on (one architecture's).

    The trainer with the least work left after taking them, so that trainers end together:
    asked costliest first, a grid then splits like a greedy partition. A trainer that already
    trains their architecture adds lanes to a set it steps anyway (its cost counts the set's
    overhead once), and is preferred when it would have at most PLACE_TOLERANCE more than the
    least; so an architecture is split across trainers only when that evens out their work.
    Remaining ties go to the trainer with the fewest trials.
    """
    after = [workload.load(*trials) for workload in workloads]
    least = min(after)

    def rank(i: int) -> tuple:
        near = after[i] <= least * (1 + PLACE_TOLERANCE)
        new_lanes = trials[0].lanes_key not in workloads[i].groups
        return (not near, new_lanes, after[i], workloads[i].trials)

    return min(range(len(workloads)), key=rank)


def place_run(
    workloads: Sequence[Workload], rooms: Sequence[int], queued: Sequence[TrialWork]
) -> list[int]:
    """The trainers (indices into `workloads`) for the trials at the head of `queued` that
    share its architecture (its run), in order; fewer than the run where the trainers' `rooms`
    (trials each can still take) run out.

    The run goes whole to the trainer `place` picks for all of it, among those with room for
    all of it, unless splitting it really evens out the trainers' work: unless placing it
    trial by trial (`place`, each among the trainers with room left) would leave the most
    loaded trainer with more than PLACE_TOLERANCE less work than placing it whole, and whole
    it would leave a trainer with more than an even share of all the work known (theirs and the
    queue's, whose trials behind the run can still even the trainers out). A set split in two
    pays its window's overhead twice, so a split that evens out little is work lost; where no
    trainer has room for all of it, it is placed trial by trial.
    """
    if not queued:
        return []
    run = list(itertools.takewhile(lambda trial: trial.lanes_key == queued[0].lanes_key, queued))
    whole = [i for i, room in enumerate(rooms) if room >= len(run)]
    if len(run) == 1 and whole:  # one trial: placed alike either way
        return [whole[place([workloads[i] for i in whole], *run)]]
    split, ahead = _trial_by_trial(workloads, rooms, run)
    if whole:
        best = whole[place([workloads[i] for i in whole], *run)]
        loads = [workload.load() for workload in workloads]
        whole_most = max([*loads[:best], workloads[best].load(*run), *loads[best + 1 :]])
        if whole_most <= max(workload.load() for workload in ahead) * (1 + PLACE_TOLERANCE):
            return [best] * len(run)
        even = (sum(loads) + queued_work(queued)) / len(workloads)
        if whole_most <= even * (1 + PLACE_TOLERANCE):
            return [best] * len(run)
    return split


def _trial_by_trial(
    workloads: Sequence[Workload], rooms: Sequence[int], run: Sequence[TrialWork]
) -> tuple[list[int], list[Workload]]:
    """`run` placed one trial at a time (`place`) on trainers with room: their indices, and the
    trainers' workloads after it (those that took none, as they were)."""
    placed_on: list[int] = []
    ahead = list(workloads)  # each copied once it takes a trial
    left = list(rooms)
    for trial in run:
        roomy = [i for i, room in enumerate(left) if room > 0]
        if not roomy:
            break
        chosen = roomy[place([ahead[i] for i in roomy], trial)]
        if ahead[chosen] is workloads[chosen]:
            ahead[chosen] = workloads[chosen].copy()
        ahead[chosen].add(trial)
        left[chosen] -= 1
        placed_on.append(chosen)
    return placed_on, ahead


def queued_work(trials: Iterable[TrialWork]) -> float:
    """The work of `trials` not yet placed, each architecture's as one set of lanes."""
    queue = Workload()
    for trial in trials:
        queue.add(trial)
    return queue.load()
