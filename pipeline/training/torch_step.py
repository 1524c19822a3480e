"""K stacked LSTMs of one architecture, trained in lockstep as one set of torch tensors.

Small LSTMs are overhead-bound: a window of state 4 costs about what one of state 16 does, so
instead of one model per call we stack K models on a trailing "trial" axis and vectorize over it
(the arrays' layout: layout.py).

`train_window` is the hot path: forward, the backward written out by hand, and Adagrad, in one
function without autograd, which torch.compile turns into a few fused loops. Writing the
backward by hand also makes the truncation structural: it starts every window with a zero
gradient on the final state and never computes one for the initial state, so no gradient can
cross a window boundary and the carried state never holds a graph. `forward` is the same model
for predictions and for checking those hand-written gradients against autograd. On the CPU the
same update runs as numba kernels, on numpy arrays (numba_step.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.training.arrays import (
    ADAGRAD_INITIAL_ACCUMULATOR,
    FORGET_BIAS,
    State,
    WindowArrays,
    WindowResult,
    WindowStep,
    initial_weights,
    layer_of,
    num_layers,
)

__all__ = [
    "ADAGRAD_INITIAL_ACCUMULATOR",
    "FORGET_BIAS",
    "State",
    "WindowArrays",
    "WindowStep",
    "eager_step",
    "forward",
    "inductor_step",
    "init_adagrad",
    "init_state",
    "init_weights",
    "train_window",
]

Weights = list[torch.Tensor]


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
    """`layout.initial_weights` of K models, as tensors on `device`."""
    return [torch.from_numpy(w).to(device) for w in initial_weights(model, seeds)]


def init_adagrad(weights: Weights) -> Weights:
    """Adagrad's accumulators, one per weight."""
    return [torch.full_like(w, ADAGRAD_INITIAL_ACCUMULATOR) for w in weights]


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
        tape = _LayerTape(
            *_layer_forward(*layer_of(weights, layer), inputs, *layer_of(state, layer))
        )
        inputs = tape.outputs
        last_h.append(tape.outputs[:, -1])
        last_c.append(tape.c_last)
    return _logits(*weights[-2:], inputs), State(torch.stack(last_h), torch.stack(last_c))


class TorchPieces(NamedTuple):
    """The torch functions one window's update is made of, eager or compiled.

    Compiling pieces rather than the whole window keeps each graph small and shared: every
    layer after the first has the same shapes, so one compiled piece serves them all, and a
    network of any depth reuses what another depth compiled.
    """

    layer_forward: Callable[..., tuple]
    head_update: Callable[..., tuple]
    layer_backward_update: Callable[..., tuple]


def train_window(
    arrays: WindowArrays, x: torch.Tensor, y: torch.Tensor, pieces: TorchPieces | None = None
) -> WindowResult:
    """One truncated-BPTT update of K models on one window.

    x, y: (B, T, K) inputs and 0/1 targets; `arrays.lr`: (K,) Adagrad learning rates;
    `arrays.active`: (K,) bool, false for models that stopped (pruned, or diverged) and must not
    change. Returns the loss of each model (mean cross-entropy over the window, before the
    update), the logit of class 1 minus that of class 0 (B, T, K), and the arrays after the
    window: updated weights and accumulators, the state to carry into the next window, and
    `active` with the models whose loss is not finite switched off, so that a diverged model
    keeps its last finite weights.
    """
    pieces = pieces or EAGER
    weights, accum, state, lr, active = arrays
    layers = num_layers(weights)
    inputs = x.unsqueeze(2)  # (B, T, 1, K): one scalar per step
    tapes = []
    for layer in range(layers):
        tape = _LayerTape(
            *pieces.layer_forward(*layer_of(weights, layer), inputs, *layer_of(state, layer))
        )
        tapes.append(tape)
        inputs = tape.outputs
    losses, margin, still, d_outputs, *head = pieces.head_update(
        *weights[-2:], *accum[-2:], inputs, y, lr, active
    )
    new_weights, new_accum = list(weights), list(accum)
    new_weights[-2:], new_accum[-2:] = head[:2], head[2:]
    for layer in reversed(range(layers)):
        tape = tapes[layer]
        *updated, d_outputs = pieces.layer_backward_update(
            *layer_of(weights, layer), *layer_of(accum, layer), *tape[:5], d_outputs, lr, still,
            layer > 0,
        )  # fmt: skip
        new_weights[3 * layer : 3 * layer + 3] = updated[:3]
        new_accum[3 * layer : 3 * layer + 3] = updated[3:]
    new_state = State(
        torch.stack([t.outputs[:, -1] for t in tapes]), torch.stack([t.c_last for t in tapes])
    )
    return WindowResult(losses, margin, WindowArrays(new_weights, new_accum, new_state, lr, still))


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


EAGER = TorchPieces(_layer_forward, _head_update, _layer_backward_update)


def eager_step() -> WindowStep:
    """torch's step without a compiler."""
    return WindowStep("eager", _eager_window)


@functools.cache
def inductor_step() -> WindowStep:
    """One torch.compile step per process, so that a Ray worker compiles once for all its
    tasks, and a compile that failed is not tried again."""
    window = functools.partial(_torch_window, pieces=compiled_pieces())
    return WindowStep("inductor", window, fallback=_eager_window)


def _eager_window(arrays: WindowArrays, x: torch.Tensor, y: torch.Tensor) -> WindowResult:
    return _torch_window(arrays, x, y, pieces=EAGER)


@torch.no_grad()  # the backward is written out: nothing needs autograd's graph
def _torch_window(
    arrays: WindowArrays, x: torch.Tensor, y: torch.Tensor, pieces: TorchPieces
) -> WindowResult:
    """train_window, and a model inactive on input keeps its state too."""
    losses, margin, after = train_window(arrays, x, y, pieces)
    kept = State(
        *(
            torch.where(arrays.active, new, old)
            for new, old in zip(after.state, arrays.state, strict=True)
        )
    )
    return WindowResult(losses, margin, after._replace(state=kept))


@functools.cache
def compiled_pieces() -> TorchPieces:
    """The pieces compiled by torch.compile, with static shapes: torch compiles each kernel
    once per state size and batch width and caches it on disk. The trainer pads batches to
    whole vectors (LANES), so the widths are few, and every model runs the same full-vector
    code whatever the width: its losses are the same bits alone or batched."""
    # Each state size, width and layer position is a version of a kernel; torch's default of
    # 8 versions would silently send a wide study back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return TorchPieces(*(_compile(piece) for piece in EAGER))


def _compile(piece: Callable[..., tuple]) -> Callable[..., tuple]:
    # dynamic=False: torch would otherwise turn a size that changed between calls symbolic, so
    # that a kernel's code, and the losses, depended on what the process happened to run first.
    # A C++ wrapper allocates a kernel's many small buffers far faster than Python does.
    return torch.compile(piece, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})


def _matmul(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-model v @ w: v (..., I, K), w (I, J, K) → (..., J, K)."""
    return (v.unsqueeze(-2) * w).sum(dim=-3)


def _matmul_t(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-model d @ wᵀ: d (..., J, K), w (I, J, K) → (..., I, K)."""
    return (d.unsqueeze(-3) * w).sum(dim=-2)


def _outer_sum(v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per-model Σ over batch and time of v ⊗ d: v (B, T, I, K), d (B, T, J, K) → (I, J, K)."""
    return (v.unsqueeze(-2) * d.unsqueeze(-3)).sum(dim=(0, 1))
