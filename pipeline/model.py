"""K stacked LSTMs of one architecture, trained in lockstep as one set of tensors.

Small LSTMs are overhead-bound: a window of state 4 costs about what one of state 16 does, so
instead of one model per call we stack K models on a trailing "trial" axis and vectorize over it.
Every weight has shape (..., K); model k owns the slice [..., k] and no operation mixes two
models, so a model follows the same arithmetic whatever else is in its batch.

Weights, a flat list (flat so that torch.compile sees plain tensors):
    per layer l: w_input (I_l, 4H, K), w_hidden (H, 4H, K), bias (4H, K)   (I_0 = 1, else H)
    then the head: w_out (H, 2, K), b_out (2, K)
Gates are ordered i, f, o, g so that one sigmoid covers the first three and one tanh the last.
State is (h, c), each (num_layers, B, H, K), like the tutorial's [num_layers, 2, batch, state].

`train_window` is the hot path: forward, the backward written out by hand, and Adagrad, in one
function without autograd, which torch.compile turns into a few fused loops. Writing the
backward by hand also makes the truncation structural: it starts every window with a zero
gradient on the final state and never computes one for the initial state, so no gradient can
cross a window boundary and the carried state never holds a graph. `forward` is the same model
for predictions and for checking those hand-written gradients against autograd.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.cost import models_to_vectorize_over
from pipeline.data import INIT_STREAM, rng_for

log = logging.getLogger(__name__)

# TensorFlow's LSTMCell adds 1.0 to the forget gate, and its AdagradOptimizer starts every
# accumulator at 0.1; both matter for matching the tutorial's convergence.
FORGET_BIAS = 1.0
ADAGRAD_INITIAL_ACCUMULATOR = 0.1
NUM_CLASSES = 2

Weights = list[torch.Tensor]


class State(NamedTuple):
    """The carried LSTM state of every layer: h and c, each (num_layers, B, H, K)."""

    h: torch.Tensor
    c: torch.Tensor


class _LayerTape(NamedTuple):
    """What the backward of one layer needs from its forward, each (B, T, ·, K), and its final c."""

    inputs: torch.Tensor  # (B, T, I, K)
    h_prev: torch.Tensor  # (B, T, H, K): h entering each step
    c_prev: torch.Tensor  # (B, T, H, K)
    gates: torch.Tensor  # (B, T, 4H, K): i, f, o after sigmoid, g after tanh
    tanh_c: torch.Tensor  # (B, T, H, K)
    outputs: torch.Tensor  # (B, T, H, K): h after each step
    c_last: torch.Tensor  # (B, H, K)


def init_weights(model: ModelConfig, seeds: Sequence[int], device: torch.device) -> Weights:
    """Initial weights of K models, model k drawn from its own seed as the tutorial's TF code does.

    LSTM kernels are Glorot-uniform over TensorFlow's joint [input + hidden, 4H] matrix, biases 0
    except the forget gate's 1.0, the output weights uniform in [0, 1) and the output bias 0.
    """
    per_model = [_init_one(model, seed) for seed in seeds]
    return [
        torch.from_numpy(np.stack(parts, axis=-1)).to(device)
        for parts in zip(*per_model, strict=True)
    ]


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


def init_adagrad(weights: Weights) -> Weights:
    """Adagrad's accumulators, one per weight."""
    return [torch.full_like(w, ADAGRAD_INITIAL_ACCUMULATOR) for w in weights]


def num_layers(weights: Weights) -> int:
    return (len(weights) - 2) // 3


def init_state(weights: Weights, batch_size: int) -> State:
    """Zero state for every layer; device and dtype follow the weights."""
    w_hidden = weights[1]  # (H, 4H, K)
    units, models = w_hidden.shape[0], w_hidden.shape[-1]
    zeros = w_hidden.new_zeros(num_layers(weights), batch_size, units, models)
    return State(zeros, zeros.clone())


def forward(weights: Weights, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
    """Logits (B, T, 2, K) of a window x (B, T, K), and the state after it; autograd-friendly."""
    inputs = x.unsqueeze(2)  # (B, T, 1, K): one scalar per step
    last_h, last_c = [], []
    for layer in range(num_layers(weights)):
        tape = _LayerTape(*_layer_forward(*_layer(weights, layer), inputs, *_layer(state, layer)))
        inputs = tape.outputs
        last_h.append(tape.outputs[:, -1])
        last_c.append(tape.c_last)
    return _logits(*weights[-2:], inputs), State(torch.stack(last_h), torch.stack(last_c))


class Kernels(NamedTuple):
    """The pieces one window's update is made of, eager or compiled.

    Compiling pieces rather than the whole window keeps each graph small and shared: every
    layer after the first has the same shapes, so one compiled piece serves them all, and a
    network of any depth reuses what another depth compiled.
    """

    layer_forward: Callable[..., tuple]
    head_update: Callable[..., tuple]
    layer_backward_update: Callable[..., tuple]


def train_window(
    weights: Weights,
    accum: Weights,
    x: torch.Tensor,
    y: torch.Tensor,
    state: State,
    lr: torch.Tensor,
    active: torch.Tensor,
    kernels: Kernels | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Weights, Weights, State, torch.Tensor]:
    """One truncated-BPTT update of K models on one window.

    x, y: (B, T, K) inputs and 0/1 targets; lr: (K,) Adagrad learning rates; active: (K,) bool,
    false for models that stopped (pruned, or diverged) and must not change.
    Returns the loss of each model (mean cross-entropy over the window, before the update), the
    logit of class 1 minus that of class 0 (B, T, K), the updated weights and accumulators, the
    state to carry into the next window, and `active` with the models whose loss is not finite
    switched off, so that a diverged model keeps its last finite weights.
    """
    kernels = kernels or EAGER
    layers = num_layers(weights)
    inputs = x.unsqueeze(2)  # (B, T, 1, K): one scalar per step
    tapes = []
    for layer in range(layers):
        tape = _LayerTape(
            *kernels.layer_forward(*_layer(weights, layer), inputs, *_layer(state, layer))
        )
        tapes.append(tape)
        inputs = tape.outputs
    losses, margin, active, d_outputs, *head = kernels.head_update(
        *weights[-2:], *accum[-2:], inputs, y, lr, active
    )
    new_weights, new_accum = list(weights), list(accum)
    new_weights[-2:], new_accum[-2:] = head[:2], head[2:]
    for layer in reversed(range(layers)):
        tape = tapes[layer]
        *updated, d_outputs = kernels.layer_backward_update(
            *_layer(weights, layer), *_layer(accum, layer), *tape[:5], d_outputs, lr, active,
            layer > 0,
        )  # fmt: skip
        new_weights[3 * layer : 3 * layer + 3] = updated[:3]
        new_accum[3 * layer : 3 * layer + 3] = updated[3:]
    new_state = State(
        torch.stack([t.outputs[:, -1] for t in tapes]), torch.stack([t.c_last for t in tapes])
    )
    return losses, margin, new_weights, new_accum, new_state, active


def _layer(tensors: Sequence[torch.Tensor], layer: int) -> Sequence[torch.Tensor]:
    """A layer's three weights (or accumulators), or its (h, c) when given a State."""
    if isinstance(tensors, State):
        return tensors.h[layer], tensors.c[layer]
    return tensors[3 * layer : 3 * layer + 3]


def _layer_forward(
    w_input: torch.Tensor,
    w_hidden: torch.Tensor,
    bias: torch.Tensor,
    inputs: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """One LSTM layer over a window: inputs (B, T, I, K), h, c (B, H, K) → a _LayerTape."""
    units = w_hidden.shape[0]
    # The input projection of every step at once: only the recurrence is sequential.
    projected = _matmul(inputs, w_input) + bias  # (B, T, 4H, K)
    h_prev, c_prev, gates, tanh_c, outputs = [], [], [], [], []
    for t in range(inputs.shape[1]):
        pre = projected[:, t] + _matmul(h, w_hidden)  # (B, 4H, K)
        sig = torch.sigmoid(pre[:, : 3 * units])
        g = torch.tanh(pre[:, 3 * units :])
        i, f, o = sig[:, :units], sig[:, units : 2 * units], sig[:, 2 * units :]
        h_prev.append(h)
        c_prev.append(c)
        c = f * c + i * g
        tc = torch.tanh(c)
        h = o * tc
        gates.append(torch.cat([sig, g], dim=1))
        tanh_c.append(tc)
        outputs.append(h)
    sequences = (h_prev, c_prev, gates, tanh_c, outputs)
    return (inputs, *(torch.stack(seq, dim=1) for seq in sequences), c)


def _logits(w_out: torch.Tensor, b_out: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    return _matmul(top, w_out) + b_out  # (B, T, 2, K)


def _head_update(
    w_out: torch.Tensor,
    b_out: torch.Tensor,
    accum_w: torch.Tensor,
    accum_b: torch.Tensor,
    top: torch.Tensor,
    y: torch.Tensor,
    lr: torch.Tensor,
    active: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Loss, output layer update and the gradient flowing into the top LSTM layer's outputs."""
    logits = _logits(w_out, b_out, top)
    margin = logits[:, :, 1] - logits[:, :, 0]  # (B, T, K)
    # Cross-entropy over two classes is softplus of the margin against the target: sign = +1
    # for target 0 and -1 for target 1.
    sign = 1.0 - 2.0 * y
    losses = F.softplus(sign * margin).mean(dim=(0, 1))  # (K,)
    active = active & torch.isfinite(losses)
    window_size = margin.shape[0] * margin.shape[1]
    d_margin = torch.sigmoid(sign * margin) * sign / window_size  # (B, T, K)
    d_logits = torch.stack([-d_margin, d_margin], dim=2)  # (B, T, 2, K)
    d_top = _matmul_t(d_logits, w_out)  # (B, T, H, K)
    w_out, accum_w = _adagrad(w_out, accum_w, _outer_sum(top, d_logits), lr, active)
    b_out, accum_b = _adagrad(b_out, accum_b, d_logits.sum(dim=(0, 1)), lr, active)
    return losses, margin, active, d_top, w_out, b_out, accum_w, accum_b


def _layer_backward_update(
    w_input: torch.Tensor,
    w_hidden: torch.Tensor,
    bias: torch.Tensor,
    accum_input: torch.Tensor,
    accum_hidden: torch.Tensor,
    accum_bias: torch.Tensor,
    inputs: torch.Tensor,
    h_prev: torch.Tensor,
    c_prev: torch.Tensor,
    gates: torch.Tensor,
    tanh_c: torch.Tensor,
    d_outputs: torch.Tensor,
    lr: torch.Tensor,
    active: torch.Tensor,
    needs_input_grad: bool,
) -> tuple[torch.Tensor, ...]:
    """Backpropagate through one layer's window, update its weights, and return the gradient
    on its inputs (the outputs of the layer below), computed with the weights before the update."""
    units = w_hidden.shape[0]
    # The gradient flowing back through time starts at zero at the window's end...
    d_h = torch.zeros_like(d_outputs[:, 0])
    d_c = torch.zeros_like(d_h)
    d_pre_steps = []
    for t in reversed(range(d_outputs.shape[1])):
        i, f = gates[:, t, :units], gates[:, t, units : 2 * units]
        o, g = gates[:, t, 2 * units : 3 * units], gates[:, t, 3 * units :]
        tc = tanh_c[:, t]
        d_h = d_outputs[:, t] + d_h
        d_c = d_c + d_h * o * (1 - tc * tc)
        d_pre = torch.cat(
            [
                d_c * g * i * (1 - i),
                d_c * c_prev[:, t] * f * (1 - f),
                d_h * tc * o * (1 - o),
                d_c * i * (1 - g * g),
            ],
            dim=1,
        )  # (B, 4H, K)
        d_pre_steps.append(d_pre)
        d_c = d_c * f
        # ...and stops at its start: nothing is propagated into the initial state.
        if t > 0:
            d_h = _matmul_t(d_pre, w_hidden)
    d_pre = torch.stack(d_pre_steps[::-1], dim=1)  # (B, T, 4H, K)
    d_inputs = _matmul_t(d_pre, w_input) if needs_input_grad else None
    w_input, accum_input = _adagrad(w_input, accum_input, _outer_sum(inputs, d_pre), lr, active)
    w_hidden, accum_hidden = _adagrad(w_hidden, accum_hidden, _outer_sum(h_prev, d_pre), lr, active)
    bias, accum_bias = _adagrad(bias, accum_bias, d_pre.sum(dim=(0, 1)), lr, active)
    return w_input, w_hidden, bias, accum_input, accum_hidden, accum_bias, d_inputs


def _adagrad(
    weight: torch.Tensor,
    accum: torch.Tensor,
    grad: torch.Tensor,
    lr: torch.Tensor,
    active: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorFlow's Adagrad (accum += g², w -= lr g / sqrt(accum)) for the active models only."""
    accum_next = accum + grad * grad
    weight_next = weight - lr * grad * torch.rsqrt(accum_next)
    return torch.where(active, weight_next, weight), torch.where(active, accum_next, accum)


EAGER = Kernels(_layer_forward, _head_update, _layer_backward_update)

WindowResult = tuple[torch.Tensor, torch.Tensor, Weights, Weights, State, torch.Tensor]


class WindowStep:
    """`train_window` on one backend: call it as `(weights, accum, x, y, state, lr, active) ->
    (losses, margin, weights, accum, state, active_after)`, with train_window's meaning.

    It may update weights, accum and state in place and return them: callers never reuse what
    they passed in. A model inactive on input keeps its weights, accumulators and state.
    `backend` is "numba", "inductor" or "eager"; a torch.compile that fails on its first call
    (no C++ compiler, say) warns once and the step goes on eagerly.
    """

    def __init__(self, backend: str, window: Callable[..., WindowResult]) -> None:
        self.backend = backend
        self._window = window

    @property
    def compiled(self) -> bool:
        return self.backend != "eager"

    def __call__(self, *args: object) -> WindowResult:
        try:
            return self._window(*args)
        except Exception as error:  # whatever broke the compile, the eager step works
            if self.backend != "inductor":
                raise
            _warn_fallback("torch.compile", error)
            self.backend, self._window = "eager", _eager_window
            return self._window(*args)


def step_function(mode: bool | str, device: torch.device) -> WindowStep:
    """The training step for `train.compile` = mode (True, False or "auto") on this device.

    On the CPU, True and "auto" give the numba kernels (pipeline/kernels.py: compiled once per
    machine for every shape, then loaded from disk in a fraction of a second); on CUDA they
    give torch.compile's kernels. False, or a compiler that fails, gives eager torch; a failure
    warns once per process.
    """
    if mode is False:
        return WindowStep("eager", _eager_window)
    if device.type == "cpu":
        kernels = numba_kernels()
        return WindowStep("eager", _eager_window) if kernels is None else _numba_step(kernels)
    return _inductor_step()


@functools.cache
def numba_kernels() -> ModuleType | None:
    """pipeline.kernels with at least one family of kernels compiled or loaded from its cache;
    None (after one warning) where numba is missing, disabled or cannot compile. Once per
    process: a failure is not retried.

    Processes that start together on a cold machine share the compile: each compiles a family
    that no other is compiling, or waits for the first to be done, and each window takes the
    faster family once it is ready (see `_ready_family`)."""
    try:
        from pipeline import kernels

        kernels.first_ready()
    except Exception as error:
        _warn_fallback("numba", error)
        return None
    return kernels


def _warn_fallback(compiler: str, error: BaseException) -> None:
    text = str(error).strip()
    reason = text.splitlines()[0] if text else type(error).__name__
    log.warning("%s failed (%s); training without it", compiler, reason)


@functools.cache
def _inductor_step() -> WindowStep:
    """One torch.compile step per process, so that a Ray worker compiles once for all its
    tasks, and a compile that failed is not tried again."""
    return WindowStep("inductor", functools.partial(_torch_window, kernels=compiled_kernels()))


def _eager_window(*args: object) -> WindowResult:
    return _torch_window(*args, kernels=EAGER)


def _torch_window(
    weights: Weights,
    accum: Weights,
    x: torch.Tensor,
    y: torch.Tensor,
    state: State,
    lr: torch.Tensor,
    active: torch.Tensor,
    kernels: Kernels,
) -> WindowResult:
    """train_window, and a model inactive on input keeps its state too."""
    losses, margin, weights, accum, new_state, still = train_window(
        weights, accum, x, y, state, lr, active, kernels
    )
    kept = State(
        *(torch.where(active, new, old) for new, old in zip(new_state, state, strict=True))
    )
    return losses, margin, weights, accum, kept, still


def _numba_step(kernels: ModuleType, by_model: bool | None = None) -> WindowStep:
    """The numba step; `by_model` picks the kernels (both give the same bits), else the
    faster ones for each window's shape."""
    return WindowStep("numba", functools.partial(_numba_window, kernels, by_model=by_model))


def _numba_window(
    kernels: ModuleType,
    weights: Weights,
    accum: Weights,
    x: torch.Tensor,
    y: torch.Tensor,
    state: State,
    lr: torch.Tensor,
    active: torch.Tensor,
    by_model: bool | None = None,
) -> WindowResult:
    """train_window by the numba kernels, which update weights, accumulators and state in
    place (on contiguous copies where the caller's tensors are views)."""
    weights = [w.detach().contiguous() for w in weights]
    accum = [a.detach().contiguous() for a in accum]
    state = State(state.h.detach().contiguous(), state.c.detach().contiguous())
    arrays = _NumbaWindow(
        weights=[t.numpy() for t in weights],
        accum=[t.numpy() for t in accum],
        x=np.ascontiguousarray(x.numpy(), np.float32),
        y=np.ascontiguousarray(y.numpy(), np.float32),
        h=state.h.numpy(),
        c=state.c.numpy(),
        lr=np.ascontiguousarray(lr.detach().numpy(), np.float32),
        active=np.ascontiguousarray(active.numpy(), np.bool_),
    )
    units, models = arrays.h.shape[2], arrays.x.shape[2]
    if by_model is None:
        by_model = _ready_family(kernels, prefer_by_model=_by_model(units, models))
    else:
        kernels.require(BY_MODEL if by_model else BY_LANE)
    losses, margin, still = _window_by(_family(kernels, by_model), arrays)
    return (
        torch.from_numpy(losses),
        torch.from_numpy(margin),
        weights,
        accum,
        state,
        torch.from_numpy(still),
    )


def _by_model(units: int, models: int) -> bool:
    """Whether the kernels that run one model at a time are the faster ones here."""
    return models < models_to_vectorize_over(units)


BY_LANE, BY_MODEL = "by_lane", "by_model"


def _ready_family(kernels: ModuleType, prefer_by_model: bool) -> bool:
    """Whether a window runs on the kernels that run one model at a time: the preferred family
    when it is ready, else the other while another process compiles the preferred one (on a
    cold machine, trainers train as soon as one family is compiled). Both give the same bits,
    so a trial's losses do not depend on which family was ready when."""
    order = (BY_MODEL, BY_LANE) if prefer_by_model else (BY_LANE, BY_MODEL)
    return kernels.first_ready(order) == BY_MODEL


class _NumbaWindow(NamedTuple):
    """A window's arrays as the numba kernels take them, (..., K); updated in place."""

    weights: list[np.ndarray]
    accum: list[np.ndarray]
    x: np.ndarray  # (B, T, K)
    y: np.ndarray  # (B, T, K)
    h: np.ndarray  # (L, B, H, K)
    c: np.ndarray  # (L, B, H, K)
    lr: np.ndarray  # (K,)
    active: np.ndarray  # (K,)


class _Family(NamedTuple):
    """One family of numba kernels (pipeline/kernels.py), and where its tape holds the models."""

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


def _window_by(family: _Family, a: _NumbaWindow) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The window by one family of kernels; they update weights, accumulators and state."""
    batch, steps, models = a.x.shape
    units = a.h.shape[2]
    kept = _kept_tapes((family.model_first, batch, steps, units, len(a.h), models))
    taken = iter(range(len(kept) + 1_000))

    def tape(*shape: int) -> np.ndarray:
        # The n-th tape of a window of this shape: the same shape in every such window.
        n = next(taken)
        if n == len(kept):
            full = (models, *shape) if family.model_first else (*shape, models)
            kept.append(np.empty(full, np.float32))
        return kept[n]

    # Every layer reads step t's inputs at t + 1 of a (B, T + 1, I) sequence per model: the
    # layer below's h_seq, or for the first layer the window's x behind one unused step.
    inputs = tape(batch, steps + 1, 1)
    per_model = inputs if family.model_first else np.moveaxis(inputs, -1, 0)  # (K, B, T + 1, 1)
    per_model[:, :, 0] = 0.0
    per_model[:, :, 1:, 0] = a.x.transpose(2, 0, 1)
    tapes = []
    for layer in range(len(a.h)):
        h_seq, c_seq = tape(batch, steps + 1, units), tape(batch, steps + 1, units)
        # The kernels that run one model at a time keep their gates time major (K, T, B, 4H).
        gates = (
            tape(steps, batch, 4 * units) if family.model_first else tape(batch, steps, 4 * units)
        )
        tanh_c = tape(batch, steps, units)
        family.forward(
            *_layer(a.weights, layer), inputs, a.h[layer], a.c[layer], h_seq, c_seq, gates,
            tanh_c, a.active,
        )  # fmt: skip
        tapes.append((inputs, h_seq, c_seq, gates, tanh_c))
        inputs = h_seq
    losses = np.empty(models, np.float32)
    margin = np.empty((batch, steps, models), np.float32)
    d_outputs = tape(batch, steps, units)
    still = np.empty(models, np.bool_)
    family.head(
        *a.weights[-2:], *a.accum[-2:], inputs, a.y, a.lr, a.active, losses, margin, d_outputs,
        still,
    )  # fmt: skip
    for layer in reversed(range(len(tapes))):
        # The first layer's inputs are data: no gradient for them.
        d_inputs = tape(batch, steps, units if layer else 0)
        family.backward(
            *_layer(a.weights, layer), *_layer(a.accum, layer), *tapes[layer], d_outputs,
            d_inputs, a.lr, still,
        )  # fmt: skip
        d_outputs = d_inputs
    return losses, margin, still


# The tapes of the latest window shapes, per thread, kept for the next window of that shape: a
# fresh tape of a few hundred KB is mapped fresh from the OS, and the kernels' first writes to
# it page-faulted (measured at state 16, 3 layers, K = 28: about 600 faults per window, which
# took 40 % of the forward's time). The kernels write every tape entry they read, so what a
# kept tape held before does not matter, as np.empty's garbage did not.
_SHAPES_KEPT = 2
_kept = threading.local()


def _kept_tapes(shape: tuple) -> list[np.ndarray]:
    """The tapes kept for windows of `shape` (family, B, T, H, layers, K), in the order
    _window_by takes them; the least recently used shape's are dropped beyond _SHAPES_KEPT."""
    shapes: dict[tuple, list[np.ndarray]] = _kept.__dict__.setdefault("shapes", {})
    tapes = shapes.pop(shape, [])
    shapes[shape] = tapes  # now the most recently used
    while len(shapes) > _SHAPES_KEPT:
        del shapes[next(iter(shapes))]
    return tapes


@functools.cache
def compiled_kernels() -> Kernels:
    """The kernels compiled by torch.compile, with static shapes: torch compiles each kernel
    once per state size and batch width and caches it on disk. The trainer pads batches to
    whole vectors (LANES), so the widths are few, and every model runs the same full-vector
    code whatever the width: its losses are the same bits alone or batched."""
    # Each state size, width and layer position is a version of a kernel; torch's default of
    # 8 versions would silently send a wide study back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return Kernels(*(_compile(kernel) for kernel in EAGER))


def _compile(kernel: Callable[..., tuple]) -> Callable[..., tuple]:
    # dynamic=False: torch would otherwise turn a size that changed between calls symbolic, so
    # that a kernel's code, and the losses, depended on what the process happened to run first.
    # A C++ wrapper allocates a kernel's many small buffers far faster than Python does.
    return torch.compile(kernel, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})


def _matmul(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-model v @ w: v (..., I, K), w (I, J, K) → (..., J, K)."""
    return (v.unsqueeze(-2) * w).sum(dim=-3)


def _matmul_t(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-model d @ wᵀ: d (..., J, K), w (I, J, K) → (..., I, K)."""
    return (d.unsqueeze(-3) * w).sum(dim=-2)


def _outer_sum(v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per-model Σ over batch and time of v ⊗ d: v (B, T, I, K), d (B, T, J, K) → (I, J, K)."""
    return (v.unsqueeze(-2) * d.unsqueeze(-3)).sum(dim=(0, 1))
