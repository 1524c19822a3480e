"""The window step on the CPU by the numba kernels (kernels.py), on numpy arrays.

It never imports torch: a trainer that trains on the CPU imports numpy, numba and its kernels
only (torch's import took each trainer 0.8 s of a core at its start, before its first window),
and its lanes hold numpy arrays that the kernels update in place, with nothing to convert per
window. device.step_function hands out this step too, for torch tensors on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import numpy as np

from pipeline.training.arrays import (
    State,
    WindowArrays,
    WindowResult,
    WindowStep,
    layer_of,
    warn_fallback,
)
from pipeline.training.cost import models_to_vectorize_over

BY_LANE, BY_MODEL = "by_lane", "by_model"


def cpu_step(mode: bool | str) -> WindowStep | None:
    """The numba step for `train.compile` = mode on the CPU: None where mode is False or numba
    cannot run here (then the caller trains with eager torch)."""
    if mode is False:
        return None
    kernels = numba_kernels()
    return None if kernels is None else numba_step(kernels)


@functools.cache
def numba_kernels() -> ModuleType | None:
    """kernels.py with at least one family of kernels compiled or loaded from its cache;
    None (after one warning) where numba is missing, disabled or cannot compile. Once per
    process: a failure is not retried.

    Processes that start together on a cold machine share the compile: each compiles a family
    that no other is compiling, or waits for the first to be done, and each window takes the
    faster family once it is ready (see `_ready_family`)."""
    try:
        from pipeline.training import kernel_compile, kernels

        kernel_compile.first_ready()
    except Exception as error:
        warn_fallback("numba", error)
        return None
    return kernels


def numba_step(kernels: ModuleType, by_model: bool | None = None) -> WindowStep:
    """The numba step on numpy arrays; `by_model` picks the kernels (both give the same bits),
    else the faster ones for each window's shape. Each step keeps its own tapes (`Tapes`), so
    give each set of lanes a step of its own."""
    window = functools.partial(numba_window, kernels, by_model=by_model, tapes=Tapes())
    return WindowStep("numba", window, arrays="numpy")


class Tapes:
    """What the forward records for the backward, kept from one window to the next of the same
    shape. A fresh tape of a few hundred KB comes fresh from the OS, and the kernels' first
    writes to it page-faulted: at state 16, 3 layers, K = 28, about 600 faults per window, 40 %
    of the forward's time. The kernels write every entry of a tape before they read it, so what
    a kept tape held before never matters (a test fills them with NaN between windows)."""

    def __init__(self) -> None:
        self.shape: tuple = ()
        self.kept: list[np.ndarray] = []

    def for_window(self, shape: tuple) -> Callable[[tuple[int, ...]], np.ndarray]:
        """`take(full_shape)`, which hands out the tapes of a window of `shape` (any hashable
        key of everything the tapes' shapes depend on) in the order it is called: the n-th
        tape taken is the n-th of the last window of that shape."""
        if shape != self.shape:
            self.shape, self.kept = shape, []
        taken = iter(range(1 << 30))

        def take(full_shape: tuple[int, ...]) -> np.ndarray:
            n = next(taken)
            if n == len(self.kept):
                self.kept.append(np.empty(full_shape, np.float32))
            return self.kept[n]

        return take


def numba_window(
    kernels: ModuleType,
    arrays: WindowArrays,
    x: np.ndarray,
    y: np.ndarray,
    by_model: bool | None = None,
    tapes: Tapes | None = None,
) -> WindowResult:
    """train_window by the numba kernels, which update weights, accumulators and state in
    place: float32 arrays (bool for `active`), C-contiguous, as `Lanes` keeps them; arrays that
    are not (views, other dtypes) are copied first, and the copies returned."""
    arrays = WindowArrays(
        weights=[_dense(w, np.float32) for w in arrays.weights],
        accum=[_dense(a, np.float32) for a in arrays.accum],
        state=State(_dense(arrays.state.h, np.float32), _dense(arrays.state.c, np.float32)),
        lr=_dense(arrays.lr, np.float32),
        active=_dense(arrays.active, np.bool_),
    )
    x, y = _dense(x, np.float32), _dense(y, np.float32)
    if by_model is None:
        # The models that train: those kernels skip the others, these compute every lane.
        running = int(arrays.active.sum())
        by_model = _ready_family(prefer_by_model=_by_model(arrays.state.h.shape[2], running))
    else:
        from pipeline.training import kernel_compile  # loaded by numba_kernels already

        kernel_compile.require(BY_MODEL if by_model else BY_LANE)
    losses, margin, still = _window_by(_family(kernels, by_model), arrays, x, y, tapes or Tapes())
    return WindowResult(losses, margin, arrays._replace(active=still))


def _dense(array: np.ndarray, dtype: type) -> np.ndarray:
    return np.ascontiguousarray(array, dtype)


def _by_model(units: int, models: int) -> bool:
    """Whether the kernels that run one model at a time are the faster ones here."""
    return models < models_to_vectorize_over(units)


def _ready_family(prefer_by_model: bool) -> bool:
    """Whether a window runs on the kernels that run one model at a time: the preferred family
    when it is ready, else the other while another process compiles the preferred one (on a
    cold machine, trainers train as soon as one family is compiled). Both give the same bits,
    so a trial's losses do not depend on which family was ready when."""
    from pipeline.training import kernel_compile  # loaded by numba_kernels already

    order = (BY_MODEL, BY_LANE) if prefer_by_model else (BY_LANE, BY_MODEL)
    return kernel_compile.first_ready(order) == BY_MODEL


class _Family(NamedTuple):
    """One family of numba kernels (kernels.py), and where its tape holds the models."""

    forward: Callable[..., None]
    head: Callable[..., None]
    backward: Callable[..., None]
    model_first: bool
    """The tape is (K, B, T, ·) for the kernels that run one model at a time, else (B, T, ·, K)."""


def _family(kernels: ModuleType, by_model: bool) -> _Family:
    if by_model:
        return _Family(
            kernels.layer_forward_by_model,
            kernels.head_update_by_model,
            kernels.layer_backward_update_by_model,
            model_first=True,
        )
    return _Family(
        kernels.layer_forward, kernels.head_update, kernels.layer_backward_update, model_first=False
    )


def _window_by(
    family: _Family, a: WindowArrays, x: np.ndarray, y: np.ndarray, tapes: Tapes
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The window by one family of kernels on dense float32 arrays (..., K), which they update
    in place (weights, accumulators and state); returns (losses, margin, still active)."""
    batch, steps, models = x.shape
    h, c = a.state
    units = h.shape[2]
    take = tapes.for_window((family.model_first, len(h), batch, steps, units, models))

    def tape(*shape: int) -> np.ndarray:
        return take((models, *shape) if family.model_first else (*shape, models))

    # Every layer reads step t's inputs at t + 1 of a (B, T + 1, I) sequence per model: the
    # layer below's h_seq, or for the first layer the window's x behind one unused step.
    inputs = tape(batch, steps + 1, 1)
    per_model = inputs if family.model_first else np.moveaxis(inputs, -1, 0)  # (K, B, T + 1, 1)
    per_model[:, :, 0] = 0.0
    per_model[:, :, 1:, 0] = x.transpose(2, 0, 1)
    tapes = []
    for layer in range(len(h)):
        h_seq, c_seq = tape(batch, steps + 1, units), tape(batch, steps + 1, units)
        # The kernels that run one model at a time keep their gates time major (K, T, B, 4H).
        gates = (
            tape(steps, batch, 4 * units) if family.model_first else tape(batch, steps, 4 * units)
        )
        tanh_c = tape(batch, steps, units)
        family.forward(
            *layer_of(a.weights, layer), inputs, h[layer], c[layer], h_seq, c_seq, gates,
            tanh_c, a.active,
        )  # fmt: skip
        tapes.append((inputs, h_seq, c_seq, gates, tanh_c))
        inputs = h_seq
    losses = np.empty(models, np.float32)
    margin = np.empty((batch, steps, models), np.float32)
    d_outputs = tape(batch, steps, units)
    still = np.empty(models, np.bool_)
    family.head(
        *a.weights[-2:], *a.accum[-2:], inputs, y, a.lr, a.active, losses, margin, d_outputs,
        still,
    )  # fmt: skip
    for layer in reversed(range(len(tapes))):
        # The first layer's inputs are data: no gradient for them.
        d_inputs = tape(batch, steps, units if layer else 0)
        family.backward(
            *layer_of(a.weights, layer), *layer_of(a.accum, layer), *tapes[layer], d_outputs,
            d_inputs, a.lr, still,
        )  # fmt: skip
        d_outputs = d_inputs
    return losses, margin, still
