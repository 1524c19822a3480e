"""The window step on the CPU by the numba kernels (kernels.py), on numpy arrays.

It never imports torch: a trainer that trains on the CPU imports numpy, numba and its kernels
only (torch's import took each trainer 0.8 s of a core at its start, before its first window),
and its lanes hold numpy arrays that the kernels update in place, with nothing to convert per
window. device.step_function hands out this step too, for torch tensors on the CPU.

Which family of kernels runs a window is measured, per window shape and process: the first
windows of a shape run each family in turn, timed, and the faster is kept (`Race`).

The two families want the weights laid out differently: the one vectorized over the models
with the model axis last (..., K), as the lanes hold them, the one that runs one model at a
time with each model's weights contiguous (K, ...). The step moves the weights and
accumulators to the layout of the family that runs, and hands them back to the lanes as
(..., K) views of that storage (`_laid_out`): the lanes index them as before, and the layout
moves only when the family changes, not every window. The lanes allocate them in the layout
the step expects its windows to take (`WindowStep.stores_models_first`: a race's winner, else
the cost model's guess), so that usually they never move: at state 128, K = 128, the move of
340 MB took the first window of a fresh `train` 2.3 s of CPU, against 0.6 s for a window.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import numpy as np

from pipeline.training.arrays import (
    State,
    WindowArrays,
    WindowResult,
    WindowsResult,
    WindowStep,
    lane_chunks,
    layer_of,
    warn_fallback,
)
from pipeline.training.cost import models_to_vectorize_over
from pipeline.training.tapes import Tapes

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
    that no other is compiling, or waits for the first to be done; windows run on whichever
    family is ready (see `_ready_family`), and race the ways once both are (`Race`)."""
    try:
        from pipeline.training import kernel_compile, kernels

        kernel_compile.first_ready()
    except Exception as error:
        warn_fallback("numba", error)
        return None
    return kernels


# Windows a step may run in a row (`numba_windows`), chunk by chunk: a chunk's weights and
# accumulators then serve BLOCK_WINDOWS windows from the caches before the next chunk's evict
# them, where window after window every chunk came back from L3 or memory and a model-window
# at K >= 8 took 1.13 times as long as at K = 1 (state 128; the forward 1.22-1.26 times). In
# blocks of 2 and 4 windows, side by side (one process, medians of 22), state 128 at K = 8
# ran 1.115 and 1.120 times as fast, state 64 at K = 32 1.057 and 1.088 times.
BLOCK_WINDOWS = 4


def numba_step(kernels: ModuleType, by_model: bool | None = None) -> WindowStep:
    """The numba step on numpy arrays; `by_model` picks the kernels (both give the same bits),
    else the ones measured faster on each window's shape (`Race`). Each step keeps its own
    tapes (`Tapes`), so give each set of lanes a step of its own."""
    tapes = Tapes()
    window = functools.partial(numba_window, kernels, by_model=by_model, tapes=tapes)
    windows = functools.partial(numba_windows, kernels, by_model=by_model, tapes=tapes)
    models_first = functools.partial(_expects_by_model, by_model)
    return WindowStep(
        "numba",
        window,
        arrays="numpy",
        models_first=models_first,
        windows=windows,
        max_windows=BLOCK_WINDOWS,
    )


def _expects_by_model(by_model: bool | None, layers: int, units: int, models: int) -> bool:
    """Whether the windows of `models` lanes (all running) of this architecture will run on
    the one-model kernels, which take the weights model first: the family forced, else the
    one a race on such windows kept, else the one the cost model expects to win (`_by_model`).
    A wrong guess costs one layout move at the first window (`_laid_out`), no bit."""
    if by_model is not None:
        return by_model
    running = 1 << (models.bit_length() - 1) if models else 0
    decided = {
        shape.running: race.winner
        for shape, race in list(RACES.items())  # a copy: other trainers' threads may race
        if (shape.layers, shape.units, shape.models) == (layers, units, models) and race.winner
    }
    if running in decided:
        return decided[running] == BY_MODEL
    return _by_model(units, running)


def numba_window(
    kernels: ModuleType,
    arrays: WindowArrays,
    x: np.ndarray,
    y: np.ndarray,
    by_model: bool | None = None,
    tapes: Tapes | None = None,
) -> WindowResult:
    """train_window by the numba kernels, which update weights, accumulators and state in
    place: float32 arrays (bool for `active`), C-contiguous, as `Lanes` keeps them, the weights
    and accumulators laid out for the family that runs (`_laid_out`); arrays that are not
    (views, other dtypes, the other layout) are copied first, and the copies returned.
    `by_model` picks the family of kernels; None, the one measured faster on this window's
    shape (`Race`)."""
    arrays = _dense_arrays(arrays)
    x, y = _dense(x, np.float32), _dense(y, np.float32)
    tapes = tapes or Tapes()
    if by_model is not None:
        return _run_window(kernels, _forced_way(by_model), arrays, x, y, tapes)
    shape = window_shape(arrays, x)
    race = RACES.get(shape)
    if race is not None and race.winner is not None:
        return _run_window(kernels, race.winner, arrays, x, y, tapes)
    family = _ready_family(prefer_by_model=_by_model(shape.units, shape.running))
    if race is None and _both_loaded():
        race = RACES[shape] = Race((family, BY_LANE if family == BY_MODEL else BY_MODEL))
    if race is None:  # one family only, for now: the race waits until the other is here too
        return _run_window(kernels, family, arrays, x, y, tapes)
    way = race.next_way()
    # A race alternates the families, and so the layouts: the move is not the family's cost.
    arrays = _laid_out(arrays, model_first=way == BY_MODEL)
    started = time.thread_time()
    result = _run_window(kernels, way, arrays, x, y, tapes)
    if race.record(way, time.thread_time() - started):
        tapes.clear()
    return result


def numba_windows(
    kernels: ModuleType,
    arrays: WindowArrays,
    xs: np.ndarray,
    ys: np.ndarray,
    by_model: bool | None = None,
    tapes: Tapes | None = None,
) -> WindowsResult:
    """`numba_window` on the windows xs[i], ys[i] (W, B, T, K) in a row, with the same bits:
    a model's arithmetic is the same whichever order the models and windows run in. Where
    the one-model kernels take the lanes in chunks, each chunk runs every window before the
    next chunk starts (see BLOCK_WINDOWS); while a race of the families is still on, window
    after window, each timed as `numba_window` times it."""
    arrays = _dense_arrays(arrays)
    xs, ys = _dense(xs, np.float32), _dense(ys, np.float32)
    tapes = tapes or Tapes()
    if by_model is not None:
        return _run_windows(kernels, _forced_way(by_model), arrays, xs, ys, tapes)
    race = RACES.get(window_shape(arrays, xs[0]))
    if race is not None and race.winner is not None:
        return _run_windows(kernels, race.winner, arrays, xs, ys, tapes)
    losses = []
    for x, y in zip(xs, ys, strict=True):
        result = numba_window(kernels, arrays, x, y, tapes=tapes)
        losses.append(result.losses)
        arrays = result.arrays
    return WindowsResult(np.stack(losses), result.margin, arrays)


def _dense_arrays(arrays: WindowArrays) -> WindowArrays:
    """`arrays` with state, learning rates and mask as the kernels take them."""
    return arrays._replace(
        state=State(_dense(arrays.state.h, np.float32), _dense(arrays.state.c, np.float32)),
        lr=_dense(arrays.lr, np.float32),
        active=_dense(arrays.active, np.bool_),
    )


def _forced_way(by_model: bool) -> str:
    """The family `by_model` forces, loaded."""
    from pipeline.training import kernel_compile  # loaded by numba_kernels already

    way = BY_MODEL if by_model else BY_LANE
    kernel_compile.require(way)
    return way


def _run_window(
    kernels: ModuleType, way: str, arrays: WindowArrays, x: np.ndarray, y: np.ndarray, tapes: Tapes
) -> WindowResult:
    """The window run by one family, `way` (BY_LANE or BY_MODEL)."""
    losses, margin, after = _run_windows(kernels, way, arrays, x[np.newaxis], y[np.newaxis], tapes)
    return WindowResult(losses[0], margin, after)


def _run_windows(
    kernels: ModuleType,
    way: str,
    arrays: WindowArrays,
    xs: np.ndarray,
    ys: np.ndarray,
    tapes: Tapes,
) -> WindowsResult:
    """The windows xs[i], ys[i] in a row, run by one family, `way`."""
    model_first = way == BY_MODEL
    arrays = _laid_out(arrays, model_first)
    losses, margin, still = _windows_by(_family(kernels, model_first), arrays, xs, ys, tapes)
    return WindowsResult(losses, margin, arrays._replace(active=still))


def _laid_out(arrays: WindowArrays, model_first: bool) -> WindowArrays:
    """`arrays` with their weights and accumulators (..., K) laid out for a family: C-contiguous
    for the one vectorized over the models, else views of C-contiguous (K, ...) storage. Each
    is moved (copied) only where it is not laid out so already."""
    lay = _models_first_view if model_first else _models_last
    return arrays._replace(
        weights=[lay(w) for w in arrays.weights], accum=[lay(a) for a in arrays.accum]
    )


def _models_last(array: np.ndarray) -> np.ndarray:
    return _dense(array, np.float32)


def _models_first_view(array: np.ndarray) -> np.ndarray:
    """array (..., K) as a view of C-contiguous (K, ...) storage: itself where it is one."""
    storage = _models_first(array)
    if storage.dtype == np.float32 and storage.flags.c_contiguous:
        return array
    if array.dtype == np.float32 and array.flags.c_contiguous:
        return _models_last_view(_transposed(array))
    return _models_last_view(np.ascontiguousarray(storage, np.float32))


# Rows of a (..., K) array moved model first at a time: a block of a few hundred KB at
# K = 128, which stays in the caches while it is written out to K places.
TRANSPOSE_ROWS = 512


def _transposed(array: np.ndarray) -> np.ndarray:
    """A C-contiguous (..., K) array copied to C-contiguous (K, ...) storage, block by block:
    numpy's own copy of the transposed view walked the source K floats apart, a cache line
    per float, and took 1.5-4 s for the 322 MB of 128 models at state 128 (0.2 s so)."""
    models = array.shape[-1]
    rows = array.reshape(-1, models)
    storage = np.empty((models, len(rows)), np.float32)
    for start in range(0, len(rows), TRANSPOSE_ROWS):
        storage[:, start : start + TRANSPOSE_ROWS] = rows[start : start + TRANSPOSE_ROWS].T
    return storage.reshape(models, *array.shape[:-1])


def _models_first(array: np.ndarray) -> np.ndarray:
    """The (K, ...) storage of a `_models_first_view`: a view, the last axis moved first.
    `ndarray.transpose`, not `np.moveaxis`, whose checks in Python took 6.5 µs a call against
    1 µs, and a window of 3 layers makes about 70 such views (0.4 ms a window, a third of a
    window of 8 models at state 16)."""
    return array.transpose(array.ndim - 1, *range(array.ndim - 1))


def _models_last_view(array: np.ndarray) -> np.ndarray:
    """array (K, ...) viewed as (..., K), as `_models_first` the other way."""
    return array.transpose(*range(1, array.ndim), 0)


def _dense(array: np.ndarray, dtype: type) -> np.ndarray:
    return np.ascontiguousarray(array, dtype)


class WindowShape(NamedTuple):
    """What a window's speed on either family depends on: the kernels that run one model at a
    time take time in proportion to the models that train (`running`), those vectorized over
    the models in proportion to all of them (`models`). Running counts are grouped by their
    highest bit (1, 2-3, 4-7, ...), so that lanes emptying one by one at a study's end start
    a few races, not one per count."""

    layers: int
    batch: int
    steps: int
    units: int
    models: int
    running: int
    """The highest power of two at most the count of models that train (0 when none does)."""


def window_shape(arrays: WindowArrays, x: np.ndarray) -> WindowShape:
    """The shape of a window of `arrays` with inputs x (B, T, K)."""
    layers, batch, units, models = arrays.state.h.shape
    running = int(arrays.active.sum())
    group = 1 << (running.bit_length() - 1) if running else 0
    return WindowShape(layers, batch, x.shape[1], units, models, group)


TIMED_WINDOWS = 2
"""Windows of a shape timed each way before the fastest is kept for good."""

FORFEIT_RATIO = 3.0
"""A way whose window, even its untimed first, takes this many times the best timed window of
a way that has run all its windows loses the race there: its page-ins cannot explain that
much (a fresh tape's faults cost at most about half a window, measured at state 16), and at
state 128, K = 128 each window of the vectorized kernels took 3 s against 0.65 s."""


class Race:
    """The first windows of a shape in a process, run each way in turn, the fastest kept.

    The ways: the two families of kernels. Each runs one window untimed (it pages in its fresh
    tapes and fills the caches with its own layout), then TIMED_WINDOWS timed ones, all in a
    row, so that the weights' layout moves at most twice in a race (interleaved, it moved every
    window: at state 128, K = 128, 0.6 s each time); the way with the shortest best window
    wins; a way far slower than one that has finished forfeits at once (FORFEIT_RATIO). A
    window's time is the CPU time of its thread, so that other processes taking the
    core meanwhile do not count (at a load of 9 on 2 cores, a shape's wall times varied about
    2 times from round to round, its CPU times 1.2 to 1.3 times). Every window trains for real,
    and every way gives a model the same bits, so a race changes what a trial computes in no
    bit, only how long the windows took. The cost model (`cost.models_to_vectorize_over`)
    only says which family runs first, and alone while the other is not loaded."""

    def __init__(self, order: tuple[str, ...]) -> None:
        self.order = order
        self.ran = dict.fromkeys(order, 0)
        self.seconds: dict[str, list[float]] = {way: [] for way in order}
        self.winner: str | None = None

    def next_way(self) -> str:
        """The way of the next window: the winner once there is one, else the first way in
        `order` whose windows have not all run."""
        if self.winner is not None:
            return self.winner
        return next(way for way in self.order if self.ran[way] < 1 + TIMED_WINDOWS)

    def record(self, way: str, seconds: float) -> bool:
        """Count a window run `way` that took `seconds`; True when that decides the race."""
        self.ran[way] += 1
        if self.ran[way] > 1:  # the first window of each way is not timed
            self.seconds[way].append(seconds)
        if self.winner is not None:
            return False
        finished = {w: min(t) for w, t in self.seconds.items() if len(t) >= TIMED_WINDOWS}
        if len(finished) == len(self.order):
            self.winner = min(self.order, key=lambda w: finished[w])
            return True
        best = min(finished.values(), default=None)
        if way not in finished and best is not None and seconds > FORFEIT_RATIO * best:
            self.winner = min(finished, key=lambda w: finished[w])  # `way` forfeits
            return True
        return False


RACES: dict[WindowShape, Race] = {}
"""This process's races, by window shape: each decides once, when its windows have run."""


def measured_families() -> dict[WindowShape, str]:
    """The family (BY_LANE or BY_MODEL) each window shape runs in this process,
    where a race decided it."""
    return {shape: race.winner for shape, race in RACES.items() if race.winner is not None}


def _both_loaded() -> bool:
    """Whether both families can run here now: loaded, or loaded now from the cache (a
    fraction of a second), never compiled for a race, and never waiting on another process."""
    from pipeline.training import kernel_compile  # loaded by numba_kernels already

    return all(kernel_compile.loaded_if_cached(family) for family in (BY_MODEL, BY_LANE))


def _by_model(units: int, models: int) -> bool:
    """Whether the cost model expects the kernels that run one model at a time to be the
    faster ones here: which family runs first, before a race has measured both."""
    return models < models_to_vectorize_over(units)


def _ready_family(prefer_by_model: bool) -> str:
    """The family a window runs on while no race decides it: the preferred family when it is
    ready, else the other while another process compiles the preferred one (on a cold machine,
    trainers train as soon as one family is compiled). Both give the same bits, so a trial's
    losses do not depend on which family was ready when."""
    from pipeline.training import kernel_compile  # loaded by numba_kernels already

    order = (BY_MODEL, BY_LANE) if prefer_by_model else (BY_LANE, BY_MODEL)
    return kernel_compile.first_ready(order)


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


def _windows_by(
    family: _Family, a: WindowArrays, xs: np.ndarray, ys: np.ndarray, tapes: Tapes
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The windows xs[i], ys[i] (W, B, T, K) in a row by one family of kernels on dense
    float32 arrays (..., K), the weights and accumulators laid out for the family
    (`_laid_out`), which they update in place (weights, accumulators and state); returns each
    window's losses (W, K), the last window's margin and which models still train. The
    kernels that run one model at a time take the lanes in chunks (`_lanes_per_chunk`), each
    chunk through every window on tapes of a chunk's size: a model's arithmetic is the same
    whichever chunk it is in, so are its bits."""
    if family.model_first:
        # The kernels take the weights' (K, ...) storage.
        a = a._replace(
            weights=[_models_first(w) for w in a.weights],
            accum=[_models_first(w) for w in a.accum],
        )
    models = len(a.active)
    size = _lanes_per_chunk(a, xs[0]) if family.model_first else models
    if models <= size:
        return _windows_of_lanes(family, a, xs, ys, tapes)
    # The entries of the models that sit out, and of chunks where every lane does.
    losses, margin = np.empty((len(xs), models), np.float32), np.empty(ys.shape[1:], np.float32)
    losses.fill(np.nan)
    margin.fill(np.nan)
    still = np.zeros(models, np.bool_)
    h, c = a.state
    for lanes in lane_chunks(models, size):
        if not a.active[lanes].any():  # emptied lanes at a study's end: no calls, no copies
            continue
        chunk = WindowArrays(
            [w[lanes] for w in a.weights],
            [w[lanes] for w in a.accum],
            State(_dense(h[..., lanes], np.float32), _dense(c[..., lanes], np.float32)),
            a.lr[lanes],
            a.active[lanes],
        )
        xs_lanes, ys_lanes = _dense(xs[..., lanes], np.float32), _dense(ys[..., lanes], np.float32)
        losses[:, lanes], margin[..., lanes], still[lanes] = _windows_of_lanes(
            family, chunk, xs_lanes, ys_lanes, tapes
        )
        h[..., lanes], c[..., lanes] = chunk.state
    return losses, margin, still


def _windows_of_lanes(
    family: _Family, a: WindowArrays, xs: np.ndarray, ys: np.ndarray, tapes: Tapes
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_windows_by` on all of `a`'s lanes at once, window after window; a model whose loss
    is not finite sits out the windows after, and once none trains no kernel runs."""
    losses = np.empty((len(xs), len(a.active)), np.float32)
    losses.fill(np.nan)
    active = a.active
    for window, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if window and not active.any():
            margin = np.full(y.shape, np.nan, np.float32)
            break
        losses[window], margin, active = _window_of_lanes(
            family, a._replace(active=active), x, y, tapes
        )
    return losses, margin, active


# About how many bytes of weights, accumulators and tapes the one-model kernels take through a
# window in one chunk of lanes (`_lanes_per_chunk`). A window runs every model's first layer,
# then every model's second, ..., so a model's tapes wait for its backward while every other
# model runs: at state 16, 3 layers, 156 KB a model, 20 MB at K = 128, far past a core's L2
# (512 KB here) and its share of L3, and a model-window took 1.3-1.5 times as long as at
# K = 8. In chunks of 8 or 9 models on tapes of a chunk's size, which stay in the caches from
# chunk to chunk and window to window, K = 32 and 128 took 1.08-1.10 times as long as K = 8
# (chunks over all K models' tapes: 1.29-1.33). Measured side by side in one process, windows
# of each kind alternating, thread CPU time, medians of 12.
CHUNK_BYTES = 3 * 2**19
# The fewest lanes in a chunk: each chunk costs a call of every kernel and a few copies, about
# 50-90 µs at 3 layers; chunks of 4 models cost a fifth at state 64 (994 against 1,246
# model-windows/s whole, K = 128), chunks of 8 nothing measurable.
MIN_CHUNK_LANES = 8
# The most bytes a model may take for its window to run in chunks of several: from state 128
# (3.5 MB a model at 3 layers) a model's weights and accumulators stream from memory in any
# order, and chunks of several ran no faster. One model at a time still keeps its tapes, of one
# model's size, in L2: side by side (medians of 7-25, 4 December 2026), state 128 ran 1.03-1.05
# times as fast so at K = 8 and 128 (chunks of 2: 1.01; of 4: 0.95) than all lanes at once.
MAX_CHUNKED_MODEL_BYTES = 2 * 2**20
# Tape floats per layer, batch row, step and unit: h_seq, c_seq, gates (4), tanh_c and the
# gradient on the layer's outputs.
TAPE_FLOATS = 8


def _lanes_per_chunk(a: WindowArrays, x: np.ndarray) -> int:
    """How many lanes make a chunk of about `CHUNK_BYTES` of weights, accumulators and tapes,
    and at least `MIN_CHUNK_LANES`; one where a model takes more than
    `MAX_CHUNKED_MODEL_BYTES`."""
    models = len(a.active)
    layers, batch, units, _ = a.state.h.shape
    tapes = 4 * TAPE_FLOATS * layers * batch * (x.shape[1] + 1) * units
    per_model = sum(w.nbytes for w in (*a.weights, *a.accum)) // models + tapes
    if per_model > MAX_CHUNKED_MODEL_BYTES:
        return 1
    if models <= MIN_CHUNK_LANES:
        return models
    return max(MIN_CHUNK_LANES, CHUNK_BYTES // per_model)


def _window_of_lanes(
    family: _Family, a: WindowArrays, x: np.ndarray, y: np.ndarray, tapes: Tapes
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One window on all of `a`'s lanes at once, its weights and accumulators as the
    family's kernels take them."""
    forward, gradients = _window_tapes(family.model_first, a, x, tapes)
    # The heads write the entries of the models that train; those that sit out keep these.
    losses, margin = np.empty(len(a.active), np.float32), np.empty(y.shape, np.float32)
    losses.fill(np.nan)  # fill, not np.full: 0.5 against 2.5 µs, in a window of 75 µs
    margin.fill(np.nan)
    still = np.zeros(len(a.active), np.bool_)
    h, c = a.state
    for layer, (inputs, h_seq, c_seq, gates, tanh_c) in enumerate(forward):
        family.forward(
            *layer_of(a.weights, layer), inputs, h[layer], c[layer], h_seq, c_seq, gates,
            tanh_c, a.active,
        )  # fmt: skip
    family.head(
        *a.weights[-2:], *a.accum[-2:], forward[-1][1], y, a.lr, a.active, losses, margin,
        gradients[-1], still,
    )  # fmt: skip
    for layer in reversed(range(len(forward))):
        family.backward(
            *layer_of(a.weights, layer), *layer_of(a.accum, layer), *forward[layer],
            gradients[layer + 1], gradients[layer], a.lr, still,
        )  # fmt: skip
    return losses, margin, still


def _window_tapes(
    model_first: bool, a: WindowArrays, x: np.ndarray, tapes: Tapes
) -> tuple[list[tuple[np.ndarray, ...]], list[np.ndarray]]:
    """The window's tapes: per layer (inputs, h_seq, c_seq, gates, tanh_c), the first layer's
    inputs holding x; and the gradients on the layers' inputs, [0] the data's (none) to [L]
    the top layer's outputs' (the head's), so that layer l's backward takes [l + 1] and
    writes [l]."""
    batch, steps, models = x.shape
    layers, _, units, _ = a.state.h.shape
    take = tapes.for_window((layers, batch, steps, units, models), model_first)

    def tape(*shape: int) -> np.ndarray:
        return take((models, *shape) if model_first else (*shape, models))

    # Every layer reads step t's inputs at t + 1 of a (B, T + 1, I) sequence per model: the
    # layer below's h_seq, or for the first layer the window's x behind one unused step.
    inputs = tape(batch, steps + 1, 1)
    per_model = inputs if model_first else _models_first(inputs)  # (K, B, T + 1, 1)
    per_model[:, :, 0] = 0.0
    per_model[:, :, 1:, 0] = x.transpose(2, 0, 1)
    forward = []
    for _ in range(layers):
        h_seq, c_seq = tape(batch, steps + 1, units), tape(batch, steps + 1, units)
        # The kernels that run one model at a time keep their gates time major (K, T, B, 4H).
        gates = tape(steps, batch, 4 * units) if model_first else tape(batch, steps, 4 * units)
        forward.append((inputs, h_seq, c_seq, gates, tape(batch, steps, units)))  # tanh_c
        inputs = h_seq
    gradients = [tape(batch, steps, units)]
    for layer in reversed(range(layers)):
        gradients.insert(0, tape(batch, steps, units if layer else 0))
    return forward, gradients
