"""Truncated BPTT over lanes: one trainer trains many trials of one architecture side by side.

A trainer holds L lanes. Each lane trains one trial at the trial's own position (epoch,
window), with its own weights, Adagrad accumulators, carried state and data stream: every
epoch draws new data and resets that lane's state to zeros, and within an epoch the state is
carried from window to window. A lane whose trial completes, is pruned or diverges takes the
next trial at the next window, so trials flow through a trainer one by one (continuous
batching, as LLM servers batch requests), while the window step itself runs every lane at once
(the model axis is the last axis of every tensor, see model.py). No operation mixes two lanes,
so a trial's losses do not depend on which lane it got or on what the others do.

`train` is the lockstep special case (every trial starts at window 0) used by the `train`
command. This module never imports Ray: the study runs `Lanes` inside Ray actors. The values
lanes take and give (`LaneTrial`, `Finished`, `Report`) live in exchange.py, without torch,
for the driver.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import Config, ConfigError
from pipeline.data import epoch_windows
from pipeline.exchange import Finished, LaneTrial, Report, Status, trainer_key
from pipeline.model import (
    ADAGRAD_INITIAL_ACCUMULATOR,
    State,
    Weights,
    WindowStep,
    init_weights,
    step_function,
)

log = logging.getLogger(__name__)

# Floats in the widest CPU vector (AVX-512) and a divisor of GPU warps: lanes come in
# multiples of it, so that compiled kernels always run whole vectors.
LANES = 16


class Step:
    """What `train`'s `on_step` sees after each window."""

    def __init__(self, step: int, epoch: int, window: int, losses: np.ndarray) -> None:
        self.step = step
        self.epoch = epoch
        self.window = window
        self.losses = losses
        """Each model's loss on this window, NaN for models that had stopped; shape (K,), a
        copy that later windows never overwrite."""


OnStep = Callable[[Step], Iterable[int] | None]
"""Called after every window; returns the indices of models to stop (e.g. pruned), or None."""


class Lanes:
    """L lanes of one architecture on one device, each training its own trial (module docs).

    `admit` puts a trial into a free lane (growing the lanes when none is free, and packing
    them when more than half stand empty, so that empty lanes cost little compute);
    `step` trains every running lane on its next window and returns the trials that finished
    and the reports that fell due: with `report_every`, each trial reports its mean loss every
    that many steps from step `judge_from` on, and waits (trains no window) until `resume` or
    `stop` rules on it: a pruner's verdict.
    """

    def __init__(
        self,
        shared: Config,
        step_fn: WindowStep,
        device: torch.device,
        report_every: int | None = None,
        judge_from: int = 0,
    ) -> None:
        self.shared = shared
        self.step_fn = step_fn
        self.device = device
        self.report_every = report_every
        self.judge_from = judge_from
        self.windows = shared.task.windows_per_epoch
        self.capacity = 0
        self.weights: Weights = []
        self.accum: Weights = []
        self.state = State(torch.empty(0), torch.empty(0))
        self.last_window: tuple[torch.Tensor, ...] = ()
        # numba computes each lane alone at any width; torch's kernels only in whole vectors.
        self.granule = 1 if step_fn.backend == "numba" else LANES
        self.capacity = 0
        self._resize(self.granule)

    def __len__(self) -> int:
        """Lanes holding a trial."""
        return int(self.occupied.sum())

    def admit(self, trial: LaneTrial) -> None:
        """Start `trial` in a free lane, from fresh weights and a zero state, at its window 0."""
        if trial.key in self.lane_of:
            raise ValueError(f"trial {trial.key} is already in a lane")
        if trainer_key(trial.config) != trainer_key(self.shared):
            raise ValueError(f"trial {trial.key} differs in architecture from this trainer's")
        free = np.flatnonzero(~self.occupied)
        if free.size == 0:
            self.reserve(1)
            free = np.flatnonzero(~self.occupied)
        lane = int(free[0])
        config = trial.config
        for weight, fresh in zip(
            self.weights, init_weights(config.model, [config.train.seed], self.device), strict=True
        ):
            weight[..., lane] = fresh[..., 0]
        for accum in self.accum:
            accum[..., lane] = ADAGRAD_INITIAL_ACCUMULATOR
        self.lr[lane] = config.train.lr
        self.trials[lane] = trial
        self.lane_of[trial.key] = lane
        self.occupied[lane], self.waiting[lane] = True, False
        self.position[lane], self.total[lane] = 0, config.total_steps
        self.started[lane] = time.perf_counter()
        if config.total_steps > self.trace.shape[1]:
            grown = np.full((self.capacity, config.total_steps), np.nan, np.float32)
            grown[:, : self.trace.shape[1]] = self.trace
            self.trace = grown
        self._start_epoch(lane, 0)

    def reserve(self, count: int) -> None:
        """Make sure `count` trials find a free lane, growing by whole granules."""
        missing = count - int((~self.occupied).sum())
        if missing > 0:
            self._resize(_round_up(self.capacity + missing, self.granule))

    def step(self) -> tuple[list[Finished], list[Report]]:
        """Train every running, non-waiting lane on its next window."""
        packed = _round_up(len(self), self.granule)
        if len(self) and 2 * len(self) <= self.capacity and packed < self.capacity:
            self._resize(packed)
        running = self.occupied & ~self.waiting
        if not running.any():
            return [], []
        lanes = torch.arange(self.capacity, device=self.device)
        window = torch.from_numpy(self.position % self.windows).to(self.device)
        x = self.data_x[lanes, window].permute(1, 2, 0).contiguous()  # (B, T, L)
        y = self.data_y[lanes, window].permute(1, 2, 0).contiguous()  # (B, T, L)
        if not self.shared.train.carry_state:
            self.state.h.zero_()
            self.state.c.zero_()
        active = torch.from_numpy(running).to(self.device)
        loss, margin, self.weights, self.accum, self.state, healthy = self.step_fn(
            self.weights, self.accum, x, y, self.state, self.lr, active
        )
        self.last_window = (x, y, margin)
        losses = loss.cpu().numpy()
        still_healthy = healthy.cpu().numpy()
        ran = np.flatnonzero(running)
        self.trace[ran, self.position[ran]] = losses[ran]
        self.last_losses = np.where(running, losses, np.nan).astype(np.float32)
        self.position[ran] += 1
        return self._after_window(ran, still_healthy)

    def resume(self, keys: Iterable[int]) -> None:
        """Let waiting trials go on (the pruner kept them)."""
        for key in keys:
            if key in self.lane_of:
                self.waiting[self.lane_of[key]] = False

    def stop(self, keys: Iterable[int]) -> list[Finished]:
        """Stop trials (the pruner rejected them) after the steps they ran; frees their lanes."""
        return [self._finish(self.lane_of[k], "pruned") for k in keys if k in self.lane_of]

    def _after_window(
        self, ran: np.ndarray, healthy: np.ndarray
    ) -> tuple[list[Finished], list[Report]]:
        finished, reports = [], []
        for lane in ran:
            position = int(self.position[lane])
            if not healthy[lane]:
                finished.append(self._finish(lane, "diverged"))
            elif position == self.total[lane]:
                finished.append(self._finish(lane, "complete"))
            else:
                if position % self.windows == 0:
                    self._start_epoch(lane, position // self.windows)
                if self._reports_at(position):
                    reports.append(self._report(lane, position))
        return finished, reports

    def _reports_at(self, position: int) -> bool:
        every = self.report_every
        return bool(every) and position % every == 0 and position - 1 >= self.judge_from

    def _report(self, lane: int, position: int) -> Report:
        recent = self.trace[lane, position - self.report_every : position]
        self.waiting[lane] = True
        key = self.trials[lane].key
        return Report(key, position - 1, float(recent.astype(np.float64).mean()))

    def _finish(self, lane: int, status: Status) -> Finished:
        trial = self.trials[lane]
        losses = self.trace[lane, : self.position[lane]].copy()
        self.occupied[lane], self.waiting[lane] = False, False
        self.trials[lane] = None
        del self.lane_of[trial.key]
        return Finished(trial.key, losses, status, time.perf_counter() - self.started[lane])

    def _start_epoch(self, lane: int, epoch: int) -> None:
        """Draw the lane's data of `epoch` and reset its carried state to zeros."""
        trial = self.trials[lane]
        xs, ys = epoch_windows([trial.config.task], [trial.config.train.seed], epoch)
        self.data_x[lane] = torch.from_numpy(xs[..., 0]).to(self.device)  # (W, B, T)
        self.data_y[lane] = torch.from_numpy(ys[..., 0]).to(self.device)
        self.state.h[..., lane] = 0.0
        self.state.c[..., lane] = 0.0

    def _resize(self, capacity: int) -> None:
        """Hold `capacity` lanes: the running ones first, in their order, then empty ones.

        Moving a lane changes nothing it computes (no kernel mixes lanes, and the padded ones
        always run whole vectors), so lanes may be packed when many stand empty."""
        keep = np.flatnonzero(self.occupied) if self.capacity else np.zeros(0, np.int64)
        if not self.capacity:
            self._allocate_empty()
        else:
            keep = np.arange(self.capacity) if capacity >= self.capacity else keep
        added = capacity - len(keep)
        index = torch.from_numpy(keep).to(self.device)

        def resized(tensor: torch.Tensor, axis: int) -> torch.Tensor:
            kept = tensor.index_select(axis, index)
            shape = list(tensor.shape)
            shape[axis] = added
            return torch.cat([kept, tensor.new_zeros(shape)], dim=axis).contiguous()

        def resized_array(array: np.ndarray, fill: object) -> np.ndarray:
            return np.concatenate([array[keep], np.full((added, *array.shape[1:]), fill)]).astype(
                array.dtype
            )

        self.weights = [resized(w, -1) for w in self.weights]
        self.accum = [resized(a, -1) for a in self.accum]
        self.state = State(resized(self.state.h, -1), resized(self.state.c, -1))
        self.data_x, self.data_y = resized(self.data_x, 0), resized(self.data_y, 0)
        self.lr = resized(self.lr, 0)
        self.trace = resized_array(self.trace, np.nan)
        self.occupied = resized_array(self.occupied, False)
        self.waiting = resized_array(self.waiting, False)
        self.position = resized_array(self.position, 0)
        self.total = resized_array(self.total, 0)
        self.started = resized_array(self.started, 0.0)
        self.last_losses = resized_array(self.last_losses, np.nan)
        self.trials = [self.trials[k] for k in keep] + [None] * added
        self.lane_of = {trial.key: lane for lane, trial in enumerate(self.trials) if trial}
        self.capacity = capacity

    def _allocate_empty(self) -> None:
        config, device = self.shared, self.device
        task, model = config.task, config.model
        template = init_weights(model, [0], device)
        self.weights = [w.new_zeros(*w.shape[:-1], 0) for w in template]
        self.accum = [w.new_zeros(*w.shape[:-1], 0) for w in template]
        shape = (model.num_layers, task.batch_size, model.state_size, 0)
        self.state = State(torch.zeros(shape, device=device), torch.zeros(shape, device=device))
        data_shape = (0, self.windows, task.batch_size, task.truncation)
        self.data_x = torch.zeros(data_shape, device=device)
        self.data_y = torch.zeros(data_shape, device=device)
        self.lr = torch.zeros(0, device=device)
        self.trace = np.zeros((0, 0), np.float32)
        self.occupied = np.zeros(0, bool)
        self.waiting = np.zeros(0, bool)
        self.position = np.zeros(0, np.int64)
        self.total = np.zeros(0, np.int64)
        self.started = np.zeros(0)
        self.last_losses = np.zeros(0, np.float32)
        self.trials: list[LaneTrial | None] = []
        self.lane_of: dict[int, int] = {}


@dataclass(frozen=True)
class ModelRun:
    """One model's part of a `train` run."""

    losses: np.ndarray
    """float32 loss of every step the model ran (a diverged model's last one is not finite)."""
    status: Status

    @property
    def steps(self) -> int:
        return len(self.losses)


@dataclass(frozen=True)
class TrainResult:
    """The outcome of `train`: one ModelRun per config, and what the figure needs."""

    runs: list[ModelRun]
    weights: Weights
    """Final weights, (..., K)."""
    last_window: tuple[np.ndarray, np.ndarray, np.ndarray]
    """Input, target and class-1-minus-class-0 logit of the last window trained, each (B, T, K)."""
    seconds: float
    compiled: bool


def train(configs: Sequence[Config], on_step: OnStep | None = None) -> TrainResult:
    """Train one model per config, all starting together in one trainer's lanes, and return
    every model's per-step losses.

    The configs must share the keys of `trainer_key`. Model k is initialized and fed from
    `configs[k].train.seed` alone, so it follows the same trace whatever it is trained with.
    """
    first = configs[0]
    keys = {trainer_key(c) for c in configs}
    if len(keys) > 1:
        raise ValueError(f"configs differ beyond echo_step, lr, epochs and seed: {sorted(keys)}")
    device = resolve_device(first.train.device)
    lanes = Lanes(first, step_function(first.train.compile, device), device)
    for k, config in enumerate(configs):
        lanes.admit(LaneTrial(k, config))
    count = len(configs)
    runs: dict[int, ModelRun] = {}
    started = time.perf_counter()
    step = 0
    with torch.no_grad():
        while len(lanes):
            finished, _ = lanes.step()
            if on_step is not None:
                epoch, window = divmod(step, first.task.windows_per_epoch)
                stop = on_step(Step(step, epoch, window, lanes.last_losses[:count].copy()))
                finished += lanes.stop(stop or ())
            runs.update({f.key: ModelRun(f.losses, f.status) for f in finished})
            step += 1
    seconds = time.perf_counter() - started
    last_window = tuple(t[..., :count].cpu().numpy() for t in lanes.last_window)
    return TrainResult(
        [runs[k] for k in range(count)],
        [w[..., :count] for w in lanes.weights],
        last_window,
        seconds,
        lanes.step_fn.compiled,
    )


def _round_up(count: int, granule: int) -> int:
    return max(granule, -(-count // granule) * granule)


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device = {name!r}: torch sees {torch.cuda.device_count()} CUDA devices; "
            "use auto or cpu"
        )
    return device
