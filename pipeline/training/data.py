"""The echo data of the tutorial, and the windows that truncated BPTT trains on.

`x` is a random binary series; the target `y` is `x` delayed by `echo_step`, its first `echo_step`
values 0. Both are cut into `batch_size` rows, each a contiguous sub-series, and each row is
walked in windows of `truncation` columns. Every draw comes from a numpy Generator seeded from
the model's seed and the epoch, so a model sees the same data whether it trains alone or batched.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.config import TaskConfig

# The loss of a model that has learned nothing: the target is a fair coin.
LN2 = math.log(2)
# Independent random streams under one seed: the initial weights, and each epoch's data.
INIT_STREAM = 0
DATA_STREAM = 1


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from non-negative integers."""
    state = np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def trial_seed(study_seed: int, params: Mapping[str, Any]) -> int:
    """A trial's seed, from the study's seed and the trial's parameters (dotted key → value,
    the replicate key train.seed among them), never from its trial number: numbers change
    when a study is interrupted and resumed, parameters do not."""
    text = json.dumps(sorted((key, repr(value)) for key, value in params.items()))
    digest = hashlib.sha256(text.encode()).digest()
    words = np.frombuffer(digest, dtype=np.uint32)
    return derive_seed(study_seed, *(int(w) for w in words))


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """The Generator of one stream (INIT_STREAM, or DATA_STREAM with the epoch) under `seed`."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=stream))


def echo_series(task: TaskConfig, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's input and target as in the tutorial's generateData, each (batch_size, columns).

    Row b is the contiguous sub-series [b * columns, (b + 1) * columns) of one long series, so a
    target near the start of a row echoes an input at the end of the row before.
    """
    x = rng_for(seed, DATA_STREAM, epoch).integers(0, 2, task.series_length, dtype=np.int8)
    y = np.roll(x, task.echo_step)
    y[: task.echo_step] = 0
    return x.reshape(task.batch_size, -1), y.reshape(task.batch_size, -1)


def epoch_windows(
    tasks: Sequence[TaskConfig], seeds: Sequence[int], epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """The windows of one epoch for K models, as float32 arrays x, y of shape (W, B, T, K).

    Model k gets `echo_series(tasks[k], seeds[k], epoch)`; the tasks may differ only in their
    echo step. Windows come first so that `x[w]` is one contiguous window; the model axis comes
    last because the trainer vectorizes over it.
    """
    task = tasks[0]
    # The columns after the last full window are never used, as in the tutorial.
    width = task.windows_per_epoch * task.truncation
    series = [echo_series(t, s, epoch) for t, s in zip(tasks, seeds, strict=True)]
    shape = (task.batch_size, task.windows_per_epoch, task.truncation, len(tasks))

    def windows(rows: list[np.ndarray]) -> np.ndarray:
        stacked = np.stack([r[:, :width] for r in rows], axis=-1).reshape(shape)  # (B, W, T, K)
        ordered = stacked.transpose(1, 0, 2, 3)  # (W, B, T, K)
        return np.ascontiguousarray(ordered, dtype=np.float32)

    return windows([x for x, _ in series]), windows([y for _, y in series])
