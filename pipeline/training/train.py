"""`train`: models trained together in one set of lanes (lanes.py), all starting at window 0:
the lockstep case of what a trainer does, used by the `train` command and the benchmarks. This
module never imports Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import Config
from pipeline.training.device import window_step
from pipeline.training.lanes import Lanes
from pipeline.training.torch_step import Weights
from pipeline.training.trial import LaneTrial, Status, lanes_key


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

    The configs must share the keys of `lanes_key`. Model k is initialized and fed from
    `configs[k].train.seed` alone, so it follows the same trace whatever it is trained with.
    """
    first = configs[0]
    keys = {lanes_key(c) for c in configs}
    if len(keys) > 1:
        raise ValueError(f"configs differ beyond echo_step, lr, epochs and seed: {sorted(keys)}")
    step, device = window_step(first)
    # on_step sees every window: then a window a step, else as many as the step takes.
    lanes = Lanes(first, step, device, block_windows=1 if on_step else step.max_windows)
    # Room for every model at once: admitted one by one, each would grow (copy) the lanes.
    lanes.reserve(len(configs))
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
    last_window = tuple(lanes.arrays.to_numpy(t[..., :count]) for t in lanes.last_window)
    return TrainResult(
        [runs[k] for k in range(count)],
        [torch.as_tensor(lanes.arrays.to_numpy(w[..., :count])) for w in lanes.weights],
        last_window,
        seconds,
        lanes.step_fn.compiled,
    )
