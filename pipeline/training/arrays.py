"""The arrays of K stacked LSTMs, whatever holds them: torch tensors (torch_step.py, on the CPU
or a GPU) or numpy arrays (the numba kernels' step, cpu_step.py, which never imports torch).

Every weight has shape (..., K); model k owns the slice [..., k] and no operation mixes two
models, so a model follows the same arithmetic whatever else is in its batch.

Weights, a flat list (flat so that torch.compile sees plain tensors):
    per layer l: w_input (I_l, 4H, K), w_hidden (H, 4H, K), bias (4H, K)   (I_0 = 1, else H)
    then the head: w_out (H, 2, K), b_out (2, K)
Gates are ordered i, f, o, g so that one sigmoid covers the first three and one tanh the last.
State is (h, c), each (num_layers, B, H, K), like the tutorial's [num_layers, 2, batch, state].
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from pipeline.config import ModelConfig
from pipeline.training.data import INIT_STREAM, rng_for

log = logging.getLogger(__name__)

# TensorFlow's LSTMCell adds 1.0 to the forget gate, and its AdagradOptimizer starts every
# accumulator at 0.1; both matter for matching the tutorial's convergence.
FORGET_BIAS = 1.0
ADAGRAD_INITIAL_ACCUMULATOR = 0.1
NUM_CLASSES = 2

Array = Any
"""A torch.Tensor or a numpy array, as the step that takes it wants."""
Weights = list[Array]


class State(NamedTuple):
    """The carried LSTM state of every layer: h and c, each (num_layers, B, H, K)."""

    h: Array
    c: Array


class WindowArrays(NamedTuple):
    """What a window step trains: K models' weights and Adagrad accumulators (flat lists, see
    the module docs), their carried state, learning rates (K,) and which of them train (K,
    bool; the others keep everything). The window's data, x and y, go beside it."""

    weights: Weights
    accum: Weights
    state: State
    lr: Array
    active: Array


class WindowResult(NamedTuple):
    """What a window step gives: each model's loss on the window (K,), before the update; the
    logit of class 1 minus that of class 0 (B, T, K); and the arrays after the window, whose
    `active` are the models still training (those whose loss was not finite switched off)."""

    losses: Array
    margin: Array
    arrays: WindowArrays


class WindowsResult(NamedTuple):
    """What a step of several windows in a row gives (`WindowStep.windows`): each model's loss
    on each window (W, K), NaN on the windows it sat out (a model whose loss is not finite sits
    out the windows after); the last window's margin (B, T, K); and the arrays after the last
    window."""

    losses: Array
    margin: Array
    arrays: WindowArrays


class WindowStep:
    """`train_window` (torch_step.py) on one backend: call it as `(arrays, x, y) -> WindowResult`
    with a WindowArrays of the kind `arrays` names ("torch" tensors or "numpy" arrays) and the
    window's inputs and targets x, y (B, T, K).

    It may update weights, accumulators and state in place and return them: callers never reuse
    what they passed in. A model inactive on input keeps its weights, accumulators and state.
    `backend` is "numba", "inductor" or "eager"; where `fallback` is given (torch.compile's
    step), a call that fails (no C++ compiler, say) warns once and the step goes on with
    `fallback`, the eager step. `models_first`: whether the step wants a set of lanes' weights
    and accumulators stored model first (see `stores_models_first`). `windows`: where given,
    the step runs up to `max_windows` windows in a row in one call, with the same bits as one
    call a window (see `windows`).
    """

    def __init__(
        self,
        backend: str,
        window: Callable[..., WindowResult],
        arrays: str = "torch",
        fallback: Callable[..., WindowResult] | None = None,
        models_first: Callable[[int, int, int], bool] | None = None,
        windows: Callable[..., WindowsResult] | None = None,
        max_windows: int = 1,
    ) -> None:
        self.backend = backend
        self.arrays = arrays
        self._window = window
        self._fallback = fallback
        self._models_first = models_first
        self._windows = windows
        self.max_windows = max_windows if windows is not None else 1
        """The most windows `windows` takes in one call (1: a window a call)."""

    def stores_models_first(self, layers: int, units: int, models: int) -> bool:
        """Whether `models` lanes of `layers` layers of `units` units should keep their weights
        and accumulators in model-first storage (K, ...), seen through (..., K) views, rather
        than C-contiguous (..., K): the layout the step's windows will take them in, so that
        the lanes allocate it from the start and no window moves them (a move of 128 models
        at state 128, 340 MB, took seconds). Only speed depends on it, never a bit."""
        return self._models_first is not None and self._models_first(layers, units, models)

    @property
    def compiled(self) -> bool:
        return self.backend != "eager"

    def __call__(self, arrays: WindowArrays, x: Array, y: Array) -> WindowResult:
        args = (arrays, x, y)
        try:
            return self._window(*args)
        except Exception as error:  # whatever broke the compile, the eager step works
            if self._fallback is None:
                raise
            warn_fallback("torch.compile", error)
            self.backend, self._window, self._fallback = "eager", self._fallback, None
            return self._window(*args)

    def windows(self, arrays: WindowArrays, xs: Array, ys: Array) -> WindowsResult:
        """Windows xs[i], ys[i] (W, B, T, K) in a row, W at most `max_windows`, giving each
        model what W calls would: the step may run them model by model (cpu_step.py), never
        otherwise. Callers give it only windows within which no lane's data, state or
        trial changes (lanes.py)."""
        if self._windows is None:
            raise TypeError(f"the {self.backend} step takes one window a call")
        return self._windows(arrays, xs, ys)


def warn_fallback(compiler: str, error: BaseException) -> None:
    text = str(error).strip()
    reason = text.splitlines()[0] if text else type(error).__name__
    log.warning("%s failed (%s); training without it", compiler, reason)


def initial_weights(model: ModelConfig, seeds: Sequence[int]) -> list[np.ndarray]:
    """Initial weights of K models as float32 arrays (..., K), model k drawn from its own seed
    as the tutorial's TF code does.

    LSTM kernels are Glorot-uniform over TensorFlow's joint [input + hidden, 4H] matrix, biases 0
    except the forget gate's 1.0, the output weights uniform in [0, 1) and the output bias 0.
    """
    per_model = [_init_one(model, seed) for seed in seeds]
    return [np.stack(parts, axis=-1) for parts in zip(*per_model, strict=True)]


def _init_one(model: ModelConfig, seed: int) -> list[np.ndarray]:
    rng = rng_for(seed, INIT_STREAM)
    units = model.state_size
    arrays = []
    for layer in range(model.num_layers):
        inputs = 1 if layer == 0 else units
        limit = math.sqrt(6.0 / (inputs + units + 4 * units))
        kernel = rng.uniform(-limit, limit, (inputs + units, 4 * units)).astype(np.float32)
        bias = np.zeros(4 * units, np.float32)
        bias[units : 2 * units] = FORGET_BIAS
        arrays += [kernel[:inputs], kernel[inputs:], bias]
    w_out = rng.random((units, NUM_CLASSES)).astype(np.float32)
    return [*arrays, w_out, np.zeros(NUM_CLASSES, np.float32)]


def num_layers(weights: Weights) -> int:
    return (len(weights) - 2) // 3


def layer_of(arrays: Sequence[Array], layer: int) -> Sequence[Array]:
    """A layer's three weights (or accumulators), or its (h, c) when given a State."""
    if isinstance(arrays, State):
        return arrays.h[layer], arrays.c[layer]
    return arrays[3 * layer : 3 * layer + 3]


def lane_chunks(models: int, size: int) -> list[slice]:
    """`models` lanes in the fewest chunks of at most `size`, of even sizes (they differ by one
    at most), as ranges of lanes: how both steps take wide sets of lanes through a window."""
    chunks = -(-models // size)
    return [slice(part * models // chunks, (part + 1) * models // chunks) for part in range(chunks)]
