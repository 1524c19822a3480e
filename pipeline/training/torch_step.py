"""K stacked LSTMs of one architecture, trained in lockstep as one set of torch tensors, on the
CPU without numba or on a GPU (under torch.compile).

Lanes keep every array with the model axis last, (..., K) (arrays.py). A window turns the
weights model first, (K, ...), once at its start, and runs every matrix product as one batched
matmul over the models (`torch.bmm`: cuBLAS's batched GEMM on a GPU, MKL's on the CPU), every
tape (K, T, B, ·) so that one step's slice is a (K, B, ·) batch of matrices. Only the Adagrad
update goes back to the lanes' layout, through views. The earlier formulation, per-model
elementwise products summed over the model-last layout, ran 14 to 75 times slower than the
straightforward loop at states 32 to 64 on the CPU (docs/benchmarks.md).

`train_window` is the hot path: forward, the backward written out by hand, and Adagrad, without
autograd, in three pieces that torch.compile compiles. Writing the backward by hand also makes
the truncation structural: it starts every window with a zero gradient on the final state and
never computes one for the initial state, so no gradient can cross a window boundary and the
carried state never holds a graph. `forward` is the same model for predictions and for checking
those hand-written gradients against autograd. On the CPU the same update runs as numba
kernels, on numpy arrays (cpu_step.py).
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
    """What the backward of one layer needs from its forward, each (K, T, B, ·), and its final c."""

    inputs: torch.Tensor  # (K, T, B, I)
    h_prev: torch.Tensor  # (K, T, B, H): h entering each step
    c_prev: torch.Tensor  # (K, T, B, H)
    gates: torch.Tensor  # (K, T, B, 4H): i, f, o after sigmoid, g after tanh
    tanh_c: torch.Tensor  # (K, T, B, H)
    outputs: torch.Tensor  # (K, T, B, H): h after each step
    c_last: torch.Tensor  # (K, B, H)


def init_weights(model: ModelConfig, seeds: Sequence[int], device: torch.device) -> Weights:
    """`arrays.initial_weights` of K models, as tensors on `device`."""
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


def models_first(array: torch.Tensor) -> torch.Tensor:
    """An array of the lanes' layout (..., K) as a contiguous (K, ...)."""
    return array.permute(-1, *range(array.dim() - 1)).contiguous()


def models_last(array: torch.Tensor) -> torch.Tensor:
    """A (K, ...) array as a view in the lanes' layout (..., K)."""
    return array.permute(*range(1, array.dim()), 0)


def forward(weights: Weights, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
    """Logits (B, T, 2, K) of a window x (B, T, K), and the state after it; autograd-friendly."""
    inputs = _inputs_of(x)
    last_h, last_c = [], []
    for layer in range(num_layers(weights)):
        layer_weights = [models_first(w) for w in layer_of(weights, layer)]
        h, c = (models_first(s) for s in layer_of(state, layer))
        tape = _LayerTape(*_layer_forward(*layer_weights, inputs, h, c))
        inputs = tape.outputs
        last_h.append(models_last(tape.outputs[:, -1]))
        last_c.append(models_last(tape.c_last))
    w_out, b_out = weights[-2:]
    logits = _logits(models_first(w_out), models_first(b_out), inputs)  # (K, T, B, 2)
    return logits.permute(2, 1, 3, 0), State(torch.stack(last_h), torch.stack(last_c))


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
    # Once per window, the layers' weights and the state model first, for batched matmuls.
    firsts = [[models_first(w) for w in layer_of(weights, layer)] for layer in range(layers)]
    h0, c0 = models_first(state.h), models_first(state.c)  # (K, L, B, H)
    inputs = _inputs_of(x)
    tapes = []
    for layer in range(layers):
        tape = _LayerTape(*pieces.layer_forward(*firsts[layer], inputs, h0[:, layer], c0[:, layer]))
        tapes.append(tape)
        inputs = tape.outputs
    losses, margin, still, d_outputs, *head = pieces.head_update(
        *weights[-2:], *accum[-2:], inputs, y.permute(2, 1, 0), lr, active
    )
    new_weights, new_accum = list(weights), list(accum)
    new_weights[-2:], new_accum[-2:] = head[:2], head[2:]
    for layer in reversed(range(layers)):
        tape = tapes[layer]
        *updated, d_outputs = pieces.layer_backward_update(
            *layer_of(weights, layer), *layer_of(accum, layer), *firsts[layer][:2], *tape[:5],
            d_outputs, lr, still, layer > 0,
        )  # fmt: skip
        new_weights[3 * layer : 3 * layer + 3] = updated[:3]
        new_accum[3 * layer : 3 * layer + 3] = updated[3:]
    new_state = State(
        torch.stack([models_last(t.outputs[:, -1]) for t in tapes]),
        torch.stack([models_last(t.c_last) for t in tapes]),
    )
    return WindowResult(losses, margin, WindowArrays(new_weights, new_accum, new_state, lr, still))


def _inputs_of(x: torch.Tensor) -> torch.Tensor:
    """The first layer's inputs (K, T, B, 1) of a window x (B, T, K): one scalar per step."""
    return x.permute(2, 1, 0).unsqueeze(-1)


def _layer_forward(
    w_input: torch.Tensor,
    w_hidden: torch.Tensor,
    bias: torch.Tensor,
    inputs: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """One LSTM layer over a window, model first: w_input (K, I, 4H), w_hidden (K, H, 4H), bias
    (K, 4H), inputs (K, T, B, I), h, c (K, B, H) → a _LayerTape."""
    models, steps, batch, width = inputs.shape
    units = w_hidden.shape[1]
    # The input projection of every step at once: only the recurrence is sequential.
    flat = inputs.reshape(models, steps * batch, width)
    projected = torch.baddbmm(bias.unsqueeze(1), flat, w_input).view(models, steps, batch, -1)
    h_prev, c_prev, gates, tanh_c, outputs = [], [], [], [], []
    for t in range(steps):
        pre = torch.baddbmm(projected[:, t], h, w_hidden)  # (K, B, 4H)
        sig = torch.sigmoid(pre[..., : 3 * units])
        g = torch.tanh(pre[..., 3 * units :])
        i, f, o = sig[..., :units], sig[..., units : 2 * units], sig[..., 2 * units :]
        h_prev.append(h)
        c_prev.append(c)
        c = f * c + i * g
        tc = torch.tanh(c)
        h = o * tc
        gates.append(torch.cat([sig, g], dim=-1))
        tanh_c.append(tc)
        outputs.append(h)
    sequences = (h_prev, c_prev, gates, tanh_c, outputs)
    return (inputs, *(torch.stack(seq, dim=1) for seq in sequences), c)


def _logits(w_out: torch.Tensor, b_out: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Logits (K, T, B, 2) of the top layer's outputs (K, T, B, H); w_out (K, H, 2), b_out
    (K, 2)."""
    models, steps, batch, units = top.shape
    flat = top.reshape(models, steps * batch, units)
    return torch.baddbmm(b_out.unsqueeze(1), flat, w_out).view(models, steps, batch, -1)


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
    """Loss, output layer update and the gradient flowing into the top LSTM layer's outputs.
    Weights and accumulators in the lanes' layout; top (K, T, B, H), y (K, T, B)."""
    models, steps, batch, units = top.shape
    w_first = models_first(w_out)  # (K, H, 2)
    logits = _logits(w_first, models_first(b_out), top).view(models, steps * batch, 2)
    margin = logits[..., 1] - logits[..., 0]  # (K, TB)
    # Cross-entropy over two classes is softplus of the margin against the target: sign = +1
    # for target 0 and -1 for target 1.
    sign = 1.0 - 2.0 * y.reshape(models, steps * batch)
    losses = F.softplus(sign * margin).mean(dim=1)  # (K,)
    active = active & torch.isfinite(losses)
    d_margin = torch.sigmoid(sign * margin) * sign / (steps * batch)  # (K, TB)
    d_logits = torch.stack([-d_margin, d_margin], dim=-1)  # (K, TB, 2)
    d_top = torch.bmm(d_logits, w_first.transpose(1, 2)).view(models, steps, batch, units)
    flat_top = top.reshape(models, steps * batch, units)
    grad_w = models_last(torch.bmm(flat_top.transpose(1, 2), d_logits))  # (H, 2, K)
    w_out, accum_w = _adagrad(w_out, accum_w, grad_w, lr, active)
    b_out, accum_b = _adagrad(b_out, accum_b, models_last(d_logits.sum(dim=1)), lr, active)
    margin = margin.view(models, steps, batch).permute(2, 1, 0).contiguous()  # (B, T, K)
    return losses, margin, active, d_top, w_out, b_out, accum_w, accum_b


def _layer_backward_update(
    w_input: torch.Tensor,
    w_hidden: torch.Tensor,
    bias: torch.Tensor,
    accum_input: torch.Tensor,
    accum_hidden: torch.Tensor,
    accum_bias: torch.Tensor,
    input_first: torch.Tensor,
    hidden_first: torch.Tensor,
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
    """Backpropagate through one layer's window, update its weights (and accumulators, in the
    lanes' layout), and return the gradient on its inputs (K, T, B, I), computed with the
    weights before the update (`input_first`, `hidden_first`: model first)."""
    models, steps, batch, units = d_outputs.shape
    # The gradient flowing back through time starts at zero at the window's end...
    d_h = torch.zeros_like(d_outputs[:, 0])
    d_c = torch.zeros_like(d_h)
    # Laid out once, not at every step: a transposed operand costs bmm a copy of it per call.
    hidden_t = hidden_first.transpose(1, 2).contiguous()  # (K, 4H, H)
    d_pre_steps = []
    for t in reversed(range(steps)):
        step_gates = gates[:, t]
        i, f = step_gates[..., :units], step_gates[..., units : 2 * units]
        o, g = step_gates[..., 2 * units : 3 * units], step_gates[..., 3 * units :]
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
            dim=-1,
        )  # (K, B, 4H)
        d_pre_steps.append(d_pre)
        d_c = d_c * f
        # ...and stops at its start: nothing is propagated into the initial state.
        if t > 0:
            d_h = torch.bmm(d_pre, hidden_t)
    d_pre = torch.stack(d_pre_steps[::-1], dim=1).view(models, steps * batch, 4 * units)
    d_inputs = None
    if needs_input_grad:
        d_inputs = torch.bmm(d_pre, input_first.transpose(1, 2)).view(models, steps, batch, -1)
    grad_input = _outer_sum(inputs, d_pre)
    grad_hidden = _outer_sum(h_prev, d_pre)
    w_input, accum_input = _adagrad(w_input, accum_input, grad_input, lr, active)
    w_hidden, accum_hidden = _adagrad(w_hidden, accum_hidden, grad_hidden, lr, active)
    grad_bias = models_last(d_pre.sum(dim=1))
    bias, accum_bias = _adagrad(bias, accum_bias, grad_bias, lr, active)
    return w_input, w_hidden, bias, accum_input, accum_hidden, accum_bias, d_inputs


def _outer_sum(v: torch.Tensor, d_pre: torch.Tensor) -> torch.Tensor:
    """Per model, Σ over batch and time of v ⊗ d: v (K, T, B, I), d_pre (K, TB, J) → the
    lanes' layout (I, J, K), a view."""
    models, steps, batch, width = v.shape
    flat = v.reshape(models, steps * batch, width)
    return models_last(torch.bmm(flat.transpose(1, 2), d_pre))


def _adagrad(
    weight: torch.Tensor,
    accum: torch.Tensor,
    grad: torch.Tensor,
    lr: torch.Tensor,
    active: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorFlow's Adagrad (accum += g², w -= lr g / sqrt(accum)) for the active models only.
    `grad` may be a view of a model-first array: one copy lays it out as the weight is, so
    that the update's passes run over contiguous memory."""
    grad = grad.contiguous()
    accum_next = torch.addcmul(accum, grad, grad)
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
    """The pieces compiled by torch.compile, with static shapes: torch compiles each piece
    once per state size and batch width and caches it on disk. The trainer pads batches to
    whole vectors (LANES), so the widths are few."""
    # Each state size, width and layer position is a version of a piece; torch's default of
    # 8 versions would silently send a wide study back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return TorchPieces(*(_compile(piece) for piece in EAGER))


def _compile(piece: Callable[..., tuple]) -> Callable[..., tuple]:
    # dynamic=False: torch would otherwise turn a size that changed between calls symbolic, so
    # that a kernel's code, and the losses, depended on what the process happened to run first.
    # A C++ wrapper allocates a kernel's many small buffers far faster than Python does.
    return torch.compile(piece, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
