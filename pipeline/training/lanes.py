"""Lanes: one trainer trains many trials of one architecture side by side (truncated BPTT).

A trainer holds L lanes. Each lane trains one trial at the trial's own position (epoch,
window), with its own weights, Adagrad accumulators, carried state and data stream: every
epoch draws new data and resets that lane's state to zeros, and within an epoch the state is
carried from window to window. A lane whose trial completes, is pruned or diverges takes the
next trial at the next window, so trials flow through a trainer one by one (continuous
batching, as LLM servers batch requests), while the window step itself runs every lane at once
(the model axis is the last axis of every array, see arrays.py). No operation mixes two lanes,
so a trial's losses do not depend on which lane it got or on what the others do.

The lanes hold the arrays their step takes: numpy arrays for the numba step on the CPU, and
then this module, like the step, never imports torch (a trainer on the CPU starts without it);
torch tensors on the step's device otherwise. This module never imports Ray either: the study
runs `Lanes` inside Ray actors. The values lanes take and give (`LaneTrial`, `Finished`,
`Report`) live in trial.py.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.training.arrays import (
    ADAGRAD_INITIAL_ACCUMULATOR,
    Array,
    State,
    Weights,
    WindowArrays,
    WindowStep,
    initial_weights,
)
from pipeline.training.cost import models_to_vectorize_over
from pipeline.training.data import epoch_windows
from pipeline.training.trial import Finished, LaneTrial, Report, Status, lanes_key

# Floats in the widest CPU vector (AVX-512) and a divisor of GPU warps: lanes come in
# multiples of it where a kernel vectorized over the models runs them, so that it runs whole
# vectors. Those of torch.compile need it; numba's (kernels.py, by_lane) ran a remainder as
# scalar code, which cost more than the lanes it saved (3 layers, one core, µs a window: state
# 4, 308 at K = 32 against 393 at 28 and 571 at 31; state 8, 779 against 953 and 1,540).
LANES = 16


class Lanes:
    """L lanes of one architecture on one device, each training its own trial (module docs).

    `admit` puts a trial into a free lane (growing the lanes when none is free, and packing
    them when more than half stand empty, so that empty lanes cost little compute);
    `step` trains every running lane on its next window and returns the trials that finished
    and the reports that fell due: with `report_every`, each trial reports its mean loss every
    that many steps from step `judge_from` on, and waits (trains no window) until `resume` or
    `stop` rules on it: a pruner's verdict.

    With `block_windows` above 1, where the step takes several windows a call
    (`WindowStep.max_windows`: the numba step's), `step` trains every running lane on as many
    windows as none of them crosses the end of an epoch, of its trial or of a report interval
    in, up to that many: each lane's losses are the same bits, and its trial ends, reports and
    waits at the same step, as one window a step gives. `last_windows` and
    `last_lane_windows` say what the last step ran.
    """

    def __init__(
        self,
        shared: Config,
        step_fn: WindowStep,
        device: Any = "cpu",
        report_every: int | None = None,
        judge_from: int = 0,
        block_windows: int = 1,
    ) -> None:
        """`device`: where torch tensors live (a torch.device or its name); a step on numpy
        arrays runs on the CPU. `block_windows`: the most windows a `step` may train, at
        most what the step takes a call."""
        self.shared = shared
        self._key = lanes_key(shared)  # 0.7 ms a call: once, not per admission
        self.step_fn = step_fn
        self.arrays = NUMPY if step_fn.arrays == "numpy" else _TorchArrays(device)
        self.report_every = report_every
        self.judge_from = judge_from
        self.windows = shared.task.windows_per_epoch
        most = min(block_windows, step_fn.max_windows)
        # A step resets the carried state before each window where it is not carried.
        self.block_windows = most if shared.train.carry_state else 1
        self.last_windows = 0
        """Windows the last `step` trained (0: no lane ran)."""
        self.last_lane_windows = 0
        """Windows the last `step` trained, summed over lanes."""
        self.capacity = 0
        self.weights: Weights = []
        self.accum: Weights = []
        self.state = State(self.arrays.zeros((0,)), self.arrays.zeros((0,)))
        self.last_window: tuple[Array, ...] = ()
        self._resize(self._whole(1))

    def __len__(self) -> int:
        """Lanes holding a trial."""
        return int(self.occupied.sum())

    def admit(self, trial: LaneTrial) -> None:
        """Start `trial` in a free lane, from fresh weights and a zero state, at its window 0."""
        if trial.key in self.lane_of:
            raise ValueError(f"trial {trial.key} is already in a lane")
        if lanes_key(trial.config) != self._key:
            raise ValueError(f"trial {trial.key} differs in architecture from this trainer's")
        free = np.flatnonzero(~self.occupied)
        if free.size == 0:
            self.reserve(1)
            free = np.flatnonzero(~self.occupied)
        lane = int(free[0])
        config = trial.config
        # What may fail (a trace too long to allocate) comes before the lane is taken.
        if config.total_steps > self.trace.shape[1]:
            grown = np.full((self.capacity, config.total_steps), np.nan, np.float32)
            grown[:, : self.trace.shape[1]] = self.trace
            self.trace = grown
        fresh = initial_weights(config.model, [config.train.seed])
        for weight, initial in zip(self.weights, fresh, strict=True):
            weight[..., lane] = self.arrays.from_numpy(initial[..., 0])
        for accum in self.accum:
            accum[..., lane] = ADAGRAD_INITIAL_ACCUMULATOR
        self.lr[lane] = config.train.lr
        self.trials[lane] = trial
        self.lane_of[trial.key] = lane
        self.occupied[lane], self.waiting[lane] = True, False
        self.position[lane], self.total[lane] = 0, config.total_steps
        self.started[lane] = time.perf_counter()
        try:
            self._start_epoch(lane, 0)
        except BaseException:  # an admission that fails leaves its lane free
            self._finish(lane, "complete")
            raise

    def reserve(self, count: int) -> None:
        """Make sure `count` trials find a free lane, growing as `_whole` says."""
        missing = count - int((~self.occupied).sum())
        if missing > 0:
            self._resize(self._whole(self.capacity + missing))

    def _whole(self, count: int) -> int:
        """Lanes for `count` trials: whole vectors of LANES, but as many as the trials where
        the numba kernels that run one model at a time will run them (below their switch,
        `cost.models_to_vectorize_over`). Those skip empty lanes, but every lane is one more
        model in the data, state and tapes that a window copies and lays out."""
        units = self.shared.model.state_size
        if self.step_fn.backend == "numba" and count < models_to_vectorize_over(units):
            return max(1, count)
        return _round_up(count)

    @property
    def running(self) -> np.ndarray:
        """The lanes that train at the next window: occupied, and not waiting for a verdict."""
        return self.occupied & ~self.waiting

    def step(self) -> tuple[list[Finished], list[Report]]:
        """Train every running, non-waiting lane on its next window, or its next few (see the
        class docs)."""
        count = len(self)
        if count and 2 * count <= self.capacity and self._whole(count) < self.capacity:
            self._resize(self._whole(count))
        running = self.running
        self.last_windows = self.last_lane_windows = 0
        if not running.any():
            return [], []
        ran = np.flatnonzero(running)
        block = self._block(ran)
        window = self.position % self.windows
        if not self.shared.train.carry_state:
            self.state.h[...] = 0.0
            self.state.c[...] = 0.0
        active = self.arrays.from_numpy(running)
        arrays = WindowArrays(self.weights, self.accum, self.state, self.lr, active)
        if block == 1:
            x = self.arrays.window_of(self.data_x, window)  # (B, T, L)
            y = self.arrays.window_of(self.data_y, window)  # (B, T, L)
            loss, margin, after = self.step_fn(arrays, x, y)
            losses = self.arrays.to_numpy(loss)[np.newaxis]
        else:
            xs = self._windows_of(self.data_x, window, block)  # (W, B, T, L)
            ys = self._windows_of(self.data_y, window, block)
            loss, margin, after = self.step_fn.windows(arrays, xs, ys)
            losses = self.arrays.to_numpy(loss)
            x, y = xs[-1], ys[-1]
        self.weights, self.accum, self.state = after.weights, after.accum, after.state
        self.last_window = (x, y, margin)
        still_healthy = self.arrays.to_numpy(after.active)
        trained = self._windows_trained(losses[:, ran], still_healthy[ran])
        for offset in range(block):
            lanes = ran[trained > offset]
            self.trace[lanes, self.position[lanes] + offset] = losses[offset, lanes]
        self.last_losses = np.where(running, losses[-1], np.nan).astype(np.float32)
        self.position[ran] += trained
        self.last_windows, self.last_lane_windows = block, int(trained.sum())
        return self._after_window(ran, still_healthy)

    def _block(self, ran: np.ndarray) -> int:
        """How many windows the lanes `ran` train in a row: up to `block_windows`, and none
        past the end of a lane's epoch (its data is drawn anew), of its trial, or of its
        report interval (it waits for a verdict there)."""
        if self.block_windows == 1:
            return 1
        position = self.position[ran]
        left = np.minimum(self.windows - position % self.windows, self.total[ran] - position)
        if self.report_every:
            left = np.minimum(left, self.report_every - position % self.report_every)
        return int(min(self.block_windows, left.min()))

    def _windows_of(self, data: Array, window: np.ndarray, block: int) -> Array:
        """Each lane's windows window[l] to window[l] + block - 1 of data, (W, B, T, L). A
        lane that does not train (waiting, or empty) may stand at its epoch's last windows:
        it takes the epoch's first again, which nothing reads."""
        return self.arrays.stack(
            [self.arrays.window_of(data, (window + k) % self.windows) for k in range(block)]
        )

    @staticmethod
    def _windows_trained(losses: np.ndarray, healthy: np.ndarray) -> np.ndarray:
        """How many windows of a block (losses (W, R)) each of R lanes trained: all of them,
        or up to the one whose loss was not finite (the lane diverged there)."""
        block = len(losses)
        broke = ~np.isfinite(losses)
        return np.where(healthy, block, np.argmax(broke, axis=0) + 1)

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
        # Whole arrays first: most windows end no lane's epoch, trial or report interval, and
        # a loop over every lane cost as much as the kernels of a small architecture.
        position = self.position[ran]
        diverged = ~healthy[ran]
        ended = diverged | (position == self.total[ran])
        if not self.report_every and not (ended | (position % self.windows == 0)).any():
            return [], []
        finished = [
            self._finish(lane, "diverged" if gone else "complete")
            for lane, gone in zip(ran[ended], diverged[ended], strict=True)
        ]
        going, position = ran[~ended], position[~ended]
        new_epoch = position % self.windows == 0
        for lane, at in zip(going[new_epoch], position[new_epoch], strict=True):
            self._start_epoch(lane, int(at) // self.windows)
        if not self.report_every:
            return finished, []
        due = (position % self.report_every == 0) & (position - 1 >= self.judge_from)
        return finished, [
            self._report(lane, int(at)) for lane, at in zip(going[due], position[due], strict=True)
        ]

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
        self.data_x[lane] = self.arrays.from_numpy(xs[..., 0])  # (W, B, T)
        self.data_y[lane] = self.arrays.from_numpy(ys[..., 0])
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

        def resized(array: Array, axis: int) -> Array:
            shape = list(array.shape)
            shape[axis] = added
            return self.arrays.concatenate(
                [self.arrays.take(array, keep, axis), self.arrays.zeros(tuple(shape))], axis
            )

        def resized_array(array: np.ndarray, fill: object) -> np.ndarray:
            return np.concatenate([array[keep], np.full((added, *array.shape[1:]), fill)]).astype(
                array.dtype
            )

        model = self.shared.model
        if self.step_fn.stores_models_first(model.num_layers, model.state_size, capacity):
            resized_weight = self._resized_models_first(keep, capacity)
        else:
            resized_weight = functools.partial(resized, axis=-1)
        self.weights = [resized_weight(w) for w in self.weights]
        self.accum = [resized_weight(a) for a in self.accum]
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

    def _resized_models_first(self, keep: np.ndarray, capacity: int) -> Callable[[Array], Array]:
        """How `_resize` resizes a weight or accumulator (..., L) for a step that takes them
        model first: lanes `keep`, then zeros up to `capacity`, as a (..., capacity) view of
        C-contiguous (capacity, ...) storage, which the step takes without moving it and
        `admit` writes a lane of in one contiguous run."""
        arrays = self.arrays

        def resized(array: Array) -> Array:
            storage = arrays.zeros((capacity, *array.shape[:-1]))
            storage[: len(keep)] = arrays.take(arrays.models_first(array), keep, 0)
            return arrays.models_last(storage)

        return resized

    def _allocate_empty(self) -> None:
        config, zeros = self.shared, self.arrays.zeros
        task, model = config.task, config.model
        template = initial_weights(model, [0])
        self.weights = [zeros((*w.shape[:-1], 0)) for w in template]
        self.accum = [zeros((*w.shape[:-1], 0)) for w in template]
        shape = (model.num_layers, task.batch_size, model.state_size, 0)
        self.state = State(zeros(shape), zeros(shape))
        data_shape = (0, self.windows, task.batch_size, task.truncation)
        self.data_x = zeros(data_shape)
        self.data_y = zeros(data_shape)
        self.lr = zeros((0,))
        self.trace = np.zeros((0, 0), np.float32)
        self.occupied = np.zeros(0, bool)
        self.waiting = np.zeros(0, bool)
        self.position = np.zeros(0, np.int64)
        self.total = np.zeros(0, np.int64)
        self.started = np.zeros(0)
        self.last_losses = np.zeros(0, np.float32)
        self.trials: list[LaneTrial | None] = []
        self.lane_of: dict[int, int] = {}


def _round_up(count: int) -> int:
    return max(LANES, -(-count // LANES) * LANES)


class _NumpyArrays:
    """Lanes' arrays as float32 numpy arrays (the numba step's)."""

    @staticmethod
    def zeros(shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, np.float32)

    @staticmethod
    def from_numpy(array: np.ndarray) -> np.ndarray:
        return array

    @staticmethod
    def to_numpy(array: np.ndarray) -> np.ndarray:
        return array

    @staticmethod
    def take(array: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
        return np.take(array, index, axis=axis)

    @staticmethod
    def models_first(array: np.ndarray) -> np.ndarray:
        """A view (K, ...) of an array (..., K) (`ndarray.transpose`: a sixth of
        `np.moveaxis`'s cost, on the numba step's hot path)."""
        return array.transpose(array.ndim - 1, *range(array.ndim - 1))

    @staticmethod
    def models_last(array: np.ndarray) -> np.ndarray:
        """A view (..., K) of an array (K, ...)."""
        return array.transpose(*range(1, array.ndim), 0)

    @staticmethod
    def concatenate(parts: Sequence[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(parts, axis=axis)

    @staticmethod
    def stack(parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack(parts)

    @staticmethod
    def window_of(data: np.ndarray, window: np.ndarray) -> np.ndarray:
        """Lane l's window window[l] of data (L, W, B, T), as one contiguous (B, T, L)."""
        return np.ascontiguousarray(data[np.arange(len(window)), window].transpose(1, 2, 0))


NUMPY = _NumpyArrays()


class _TorchArrays:
    """Lanes' arrays as float32 torch tensors on `device`."""

    def __init__(self, device: Any) -> None:
        import torch  # only here: a trainer on numpy arrays never imports it

        self.torch = torch
        self.device = torch.device(device)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return self.torch.zeros(shape, device=self.device)

    def from_numpy(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(array).to(self.device)

    def to_numpy(self, tensor: Any) -> np.ndarray:
        return tensor.cpu().numpy()

    def take(self, tensor: Any, index: np.ndarray, axis: int) -> Any:
        return tensor.index_select(axis, self.from_numpy(index))

    def models_first(self, tensor: Any) -> Any:
        """A view (K, ...) of a tensor (..., K)."""
        return tensor.movedim(-1, 0)

    def models_last(self, tensor: Any) -> Any:
        """A view (..., K) of a tensor (K, ...)."""
        return tensor.movedim(0, -1)

    def concatenate(self, parts: Sequence[Any], axis: int) -> Any:
        return self.torch.cat(list(parts), dim=axis)

    def stack(self, parts: Sequence[Any]) -> Any:
        return self.torch.stack(list(parts))

    def window_of(self, data: Any, window: np.ndarray) -> Any:
        """Lane l's window window[l] of data (L, W, B, T), as one contiguous (B, T, L)."""
        lanes = self.torch.arange(len(window), device=self.device)
        return data[lanes, self.from_numpy(window)].permute(1, 2, 0).contiguous()
