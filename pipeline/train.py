"""The truncated-BPTT loop: K models of one architecture trained in lockstep (one run is K = 1).

Every epoch draws new data and resets the state to zeros; within an epoch the state is carried
from window to window. After each window the trainer calls `on_step`, which sees every model's
loss and may stop models (a pruner); a model whose loss stops being finite stops by itself. A
stopped model keeps its steps so far and stops changing, while the rest of its batch goes on.
This module never imports Ray: the study wraps it in Ray tasks.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from pipeline.config import Config, ConfigError, TaskConfig
from pipeline.data import epoch_windows
from pipeline.model import (
    EAGER,
    Kernels,
    Weights,
    WindowStep,
    compiled_kernels,
    init_adagrad,
    init_state,
    init_weights,
    step_function,
    train_window,
)

log = logging.getLogger(__name__)

# Floats in the widest CPU vector (AVX-512) and a divisor of GPU warps: compiled batches are
# padded to a multiple of it.
LANES = 16
# `compile: auto` compiles when the eager run would take longer than this: then even a cold
# compile (about a minute per state size on two cores, cached on disk afterwards) pays off.
COMPILE_PAYS_OFF_SECONDS = 120.0
# Eager cost of one window per layer, measured on one core of our machines: a fixed overhead
# of about 130 small operations, plus the arithmetic of each model in the batch.
EAGER_SECONDS_PER_LAYER = 1.7e-3
EAGER_SECONDS_PER_LAYER_AND_MODEL = 3.5e-5

Status = Literal["complete", "pruned", "diverged"]


class Step:
    """What `on_step` sees after each window. `losses` is read from the device only when asked."""

    def __init__(self, step: int, epoch: int, window: int, losses: torch.Tensor) -> None:
        self.step = step
        self.epoch = epoch
        self.window = window
        self._losses = losses

    @functools.cached_property
    def losses(self) -> np.ndarray:
        """Each model's loss on this window, NaN for models that had stopped; shape (K,)."""
        return self._losses.cpu().numpy()


OnStep = Callable[[Step], Iterable[int] | None]
"""Called after every window; returns the indices of models to stop (e.g. pruned), or None."""


@dataclass(frozen=True)
class ModelRun:
    """One model's part of a training run."""

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
    """Train one model per config, all in lockstep, and return every model's per-step losses.

    The configs must share everything but the echo step, the learning rate and the seed (see
    `batch_key`). Model k is initialized and fed from `configs[k].train.seed` alone, so it
    follows the same trace whatever it is batched with.
    """
    first = configs[0]
    keys = {batch_key(c) for c in configs}
    if len(keys) > 1:
        raise ValueError(f"configs differ beyond echo_step, lr and seed: {sorted(keys)}")
    device = resolve_device(first.train.device)
    count = len(configs)
    step_fn = _step_function(first, count, device)
    # Compiled kernels run the model axis in vectors of LANES: idle copies of the first model
    # fill the last vector, so every model runs the same full-vector code (and bits) in any
    # batch, the slow masked code for a partial vector never runs, and few widths compile.
    idle = -count % LANES if step_fn.compiled else 0
    lanes = list(configs) + [first] * idle
    tasks = [c.task for c in lanes]
    seeds = [c.train.seed for c in lanes]

    weights = init_weights(first.model, seeds, device)
    accum = init_adagrad(weights)
    lr = torch.tensor([c.train.lr for c in lanes], dtype=torch.float32, device=device)
    active = torch.arange(len(lanes), device=device) < count
    losses = torch.full((first.total_steps, len(lanes)), float("nan"), device=device)
    nan = torch.tensor(float("nan"), device=device)
    pruned_at: dict[int, int] = {}
    started = time.perf_counter()
    with torch.no_grad():
        for step, (epoch, window, x, y) in enumerate(_windows(first, tasks, seeds, device)):
            if window == 0 or not first.train.carry_state:
                state = init_state(weights, first.task.batch_size)
            was_active = active
            loss, margin, weights, accum, state, active = step_fn(
                weights, accum, x, y, state, lr, active
            )
            losses[step] = torch.where(was_active, loss, nan)
            if on_step is not None:
                stop = set(on_step(Step(step, epoch, window, losses[step, :count])) or ())
                stop -= pruned_at.keys()
                if stop:
                    pruned_at.update(dict.fromkeys(stop, step))
                    active = active.clone()
                    active[sorted(stop)] = False
            # Checking reads the device, so only now and then: a batch whose models have all
            # stopped ends early.
            if step % 100 == 99 and not bool(active.any()):
                break
    seconds = time.perf_counter() - started
    traces = losses[:, :count].T.cpu().numpy()
    runs = [_model_run(trace, pruned_at.get(k)) for k, trace in enumerate(traces)]
    last_window = tuple(t[..., :count].cpu().numpy() for t in (x, y, margin))
    return TrainResult(
        runs, [w[..., :count] for w in weights], last_window, seconds, step_fn.compiled
    )


def _windows(
    config: Config, tasks: list[TaskConfig], seeds: list[int], device: torch.device
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(epoch, window, x, y) for every window of the run; each epoch draws new data."""
    for epoch in range(config.train.epochs):
        xs, ys = epoch_windows(tasks, seeds, epoch, device)
        for window in range(config.task.windows_per_epoch):
            yield epoch, window, xs[window], ys[window]


def batch_key(config: Config) -> tuple:
    """What models trained in one batch must share: everything but echo step, lr and seed."""
    task, train = config.task, config.train
    return (
        task.series_length,
        task.batch_size,
        task.truncation,
        config.model.num_layers,
        config.model.state_size,
        train.epochs,
        train.carry_state,
        train.device,
        train.compile,
    )


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


def _model_run(trace: np.ndarray, pruned_at: int | None) -> ModelRun:
    """Cut a model's trace where it stopped: its first non-finite loss, or where it was pruned."""
    ran = trace if pruned_at is None else trace[: pruned_at + 1]
    bad = np.flatnonzero(~np.isfinite(ran))
    if bad.size:
        return ModelRun(ran[: bad[0] + 1].copy(), "diverged")
    return ModelRun(ran.copy(), "complete" if pruned_at is None else "pruned")


def _step_function(config: Config, count: int, device: torch.device) -> WindowStep:
    return step_function(config.train.compile, device)


def _eager_seconds(config: Config, count: int) -> float:
    """About how long `count` models of this config take to train eagerly on one CPU core."""
    per_window = config.model.num_layers * (
        EAGER_SECONDS_PER_LAYER + EAGER_SECONDS_PER_LAYER_AND_MODEL * count
    )
    return config.total_steps * per_window


class _Step:
    """The training step on some kernels; compiled ones that fail to compile (say, with no C++
    compiler installed) are replaced by the eager ones, once, with a warning."""

    def __init__(self, kernels: Kernels) -> None:
        self.kernels = kernels

    @property
    def compiled(self) -> bool:
        return self.kernels is not EAGER

    def __call__(self, *args: object) -> tuple:
        try:
            return train_window(*args, kernels=self.kernels)
        except Exception as error:  # whatever broke the compile, the eager step works
            if not self.compiled:
                raise
            log.warning("torch.compile failed (%s); training without it", first_line(error))
            self.kernels = EAGER
            return train_window(*args, kernels=self.kernels)


@functools.cache
def _compiled_step() -> _Step:
    """One compiled step per process, so that a Ray worker compiles once for all its tasks,
    and a compile that failed is not tried again."""
    return _Step(compiled_kernels())


def first_line(error: BaseException) -> str:
    """The first line of an error's message, for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
