"""K stacked LSTMs of one architecture, trained in lockstep as one set of torch tensors, on the
CPU without numba or on a GPU (under torch.compile).

Lanes keep every array with the model axis last, (..., K) (arrays.py). This step keeps their
storage model first, (K, ...), and gives the lanes views of it in their layout (`models_last`),
so that a window finds its weights, accumulators and state model first without a copy;
`models_first` copies only what the lanes laid out anew (new lanes, a resize). Every matrix
product is one batched matmul over the models (`torch.bmm`/`baddbmm`: MKL's batched GEMM on the
CPU, cuBLAS's on a GPU; on the CPU each step's 5-row products run as numpy's matmul, twice as
fast: `matmul_add`), every tape (K, T, B, ·), so that one step's slice is a (K, B, ·) batch of
matrices, and Adagrad updates the weights in place. What does not recur runs once per window
on all T steps together: the input half of the gate matmuls before the recurrence; the gates'
derivatives between forward and backward; the weight gradients and the gradient on the inputs
after it. Each step then runs one matmul (h·W_h forward, d_pre·W_hᵀ backward) and four
elementwise passes each way, written into the tapes (`out=`) rather than stacked afterwards.
The eager step also computes only the models that train (`_train_running`), keeps its large
arrays from one window to the next (`Scratch`), and on the CPU takes wide models' lanes in
chunks that stay in the caches (`CHUNK_GATE_TAPE_BYTES`). The first formulation, per-model
elementwise products over the model-last layout, ran 14 to 75 times slower than the
straightforward loop at states 32 to 64 on the CPU (docs/benchmarks.md, docs/engine.md).

`train_window` is the hot path: forward, the backward written out by hand (torch_backward.py,
which says why), and Adagrad, without autograd, in three pieces that torch.compile compiles.
`forward` is the same model written plainly, for predictions and for checking those
hand-written gradients against autograd. On the CPU the same update runs as numba kernels, on
numpy arrays (cpu_step.py).
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
    lane_chunks,
    layer_of,
    num_layers,
)
from pipeline.training.torch_backward import (
    Scratch,
    adagrad_,
    empty,
    layer_backward_update,
    matmul_add,
    per_model,
    tanh_into,
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
    """What the backward of one layer needs from its forward, model first."""

    inputs: torch.Tensor  # (K, T, B, I)
    hs: torch.Tensor  # (K, T + 1, B, H): h entering the window, then after each step
    cs: torch.Tensor  # (K, T + 1, B, H): c likewise
    gates: torch.Tensor  # (K, T, B, 4H): i, f, o after sigmoid, g after tanh
    tanh_c: torch.Tensor  # (K, T, B, H)

    @property
    def outputs(self) -> torch.Tensor:
        """h after each step (K, T, B, H), a view."""
        return self.hs[:, 1:]


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
    """An array of the lanes' layout (..., K) as a contiguous (K, ...): the array's own storage
    where it is one (`models_last` of a contiguous array), else a copy."""
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
        tape = _LayerTape(*_plain_layer_forward(*layer_weights, inputs, h, c))
        inputs = tape.outputs
        last_h.append(tape.hs[:, -1])
        last_c.append(tape.cs[:, -1])
    w_out, b_out = (models_first(w) for w in weights[-2:])
    logits = _logits(w_out, b_out, inputs)  # (K, T, B, 2)
    state = State(*(models_last(torch.stack(s, dim=1)) for s in (last_h, last_c)))
    return logits.permute(2, 1, 3, 0), state


class TorchPieces(NamedTuple):
    """The torch functions one window's update is made of, eager or compiled.

    Compiling pieces rather than the whole window keeps each graph small and shared: every
    layer after the first has the same shapes, so one compiled piece serves them all, and a
    network of any depth reuses what another depth compiled.
    """

    layer_forward: Callable[..., tuple]
    head_update: Callable[..., tuple]
    layer_backward_update: Callable[..., torch.Tensor | None]
    scratch: Scratch | None = None
    """Where the eager pieces take their large arrays from (None: fresh ones)."""
    chunked: bool = False
    """Whether a window on the CPU takes its lanes in chunks (`_lanes_per_chunk`)."""


# On the CPU a window takes its lanes in chunks whose gates (one layer's tape of them, T·B·4H
# floats a model) come to about this many bytes, each chunk through the whole window: every
# step then finds its weights and tape slices, and the window's products their operands, in
# the caches, where a window of all the lanes streamed them from memory. With the tutorial's
# window (T = 15, B = 5) that is 64 lanes at state 32, 32 at 64, 16 at 128, and whole sets of
# up to 136 at state 16, where a chunk's calls would cost more than the caches save. Measured
# side by side in one process (per model, K = 128, 3 layers, 4 December 2026): state 64 in
# chunks of 32, 1.03-1.06 times as fast as in chunks of 64 (the budget before, 4 MiB of W_h),
# which had run 1.14-1.20 times as fast as whole; state 128 in chunks of 16, 1.05-1.08 times
# chunks of 8 or 32; state 32 in chunks of 64 as fast as whole, 0.85 times in chunks of 32.
CHUNK_GATE_TAPE_BYTES = 5 * 2**19


def train_window(
    arrays: WindowArrays,
    x: torch.Tensor,
    y: torch.Tensor,
    pieces: TorchPieces | None = None,
    keep_inputs: bool = False,
    running_only: bool = False,
) -> WindowResult:
    """One truncated-BPTT update of K models on one window.

    x, y: (B, T, K) inputs and 0/1 targets; `arrays.lr`: (K,) Adagrad learning rates;
    `arrays.active`: (K,) bool, false for models that stopped (pruned, or diverged) and must not
    change. Returns the loss of each model (mean cross-entropy over the window, before the
    update), the logit of class 1 minus that of class 0 (B, T, K), and the arrays after the
    window: updated weights and accumulators, the state to carry into the next window (an
    inactive model's as it was), and `active` with the models whose loss is not finite switched
    off, so that a diverged model keeps its last finite weights.

    Like every WindowStep, it updates weights and accumulators in place where they are views of
    model-first storage (what it returns), unless `keep_inputs`: then it works on copies.
    `running_only`: compute the active models alone, taken out of the lanes and put back
    (`_train_running`), rather than every lane with the others' updates masked.
    """
    if running_only:
        running = arrays.active.nonzero().squeeze(1)
        if len(running) < len(arrays.active):
            return _train_running(arrays, x, y, running, pieces)
    pieces = pieces or EAGER
    size = _lanes_per_chunk(arrays, x, pieces)
    if size < len(arrays.active):
        return _train_in_chunks(arrays, x, y, pieces, size, keep_inputs)
    weights, accum, state, lr, active = arrays
    first = _models_first_copy if keep_inputs else models_first
    weights, accum = [first(w) for w in weights], [first(a) for a in accum]
    h0, c0 = models_first(state.h), models_first(state.c)  # (K, L, B, H)
    inputs = _inputs_of(x)
    tapes = []
    for layer in range(num_layers(weights)):
        forward_args = (*layer_of(weights, layer), inputs, h0[:, layer], c0[:, layer])
        tape = _LayerTape(*pieces.layer_forward(*forward_args, scratch=pieces.scratch))
        tapes.append(tape)
        inputs = tape.outputs
    losses, margin, still, d_outputs = pieces.head_update(
        *weights[-2:], *accum[-2:], inputs, y.permute(2, 1, 0), lr, active
    )
    # Masking the gradients costs a pass over them: only when some model sits out.
    frozen = None if bool(still.all()) else ~still
    for layer in reversed(range(len(tapes))):
        d_outputs = pieces.layer_backward_update(
            *layer_of(weights, layer), *layer_of(accum, layer), *tapes[layer], d_outputs,
            lr, frozen, layer > 0, scratch=pieces.scratch,
        )  # fmt: skip
    moved = per_model(active, h0)
    last_h = torch.stack([tape.hs[:, -1] for tape in tapes], dim=1)  # (K, L, B, H)
    last_c = torch.stack([tape.cs[:, -1] for tape in tapes], dim=1)
    new_state = State(
        models_last(torch.where(moved, last_h, h0)), models_last(torch.where(moved, last_c, c0))
    )
    new_weights, new_accum = [models_last(w) for w in weights], [models_last(a) for a in accum]
    return WindowResult(losses, margin, WindowArrays(new_weights, new_accum, new_state, lr, still))


def _train_running(
    arrays: WindowArrays,
    x: torch.Tensor,
    y: torch.Tensor,
    running: torch.Tensor,
    pieces: TorchPieces | None,
) -> WindowResult:
    """train_window on the models `running` ((R,) lane indices) alone: their arrays gathered
    model first, their results put back in place. The others keep everything; their losses
    and margins are NaN, as the numba kernels give a model that sits out. On one thread a
    model's arithmetic does not depend on how many models a window runs (tested), so this
    changes no bit, and lanes that pad a set to whole vectors, or whose trials wait or have
    finished, cost only the gather (at K = 8 in 16 lanes, half the window)."""
    losses = arrays.lr.new_full(arrays.active.shape, torch.nan)
    margin = x.new_full(x.shape, torch.nan)
    if not len(running):
        return WindowResult(losses, margin, arrays)
    weights = [models_first(w) for w in arrays.weights]
    accum = [models_first(a) for a in arrays.accum]
    state = State(*(models_first(s) for s in arrays.state))

    def picked(first: torch.Tensor) -> torch.Tensor:
        return models_last(first.index_select(0, running))

    part = WindowArrays(
        [picked(w) for w in weights],
        [picked(a) for a in accum],
        State(*(picked(s) for s in state)),
        arrays.lr[running],
        arrays.active[running],
    )
    part_losses, part_margin, after = train_window(part, x[..., running], y[..., running], pieces)
    for whole, updated in zip([*weights, *accum], [*after.weights, *after.accum], strict=True):
        whole.index_copy_(0, running, models_first(updated))
    new_state = State(
        *(
            models_last(old.index_copy(0, running, models_first(new)))
            for old, new in zip(state, after.state, strict=True)
        )
    )
    active = torch.zeros_like(arrays.active).index_copy_(0, running, after.active)
    return WindowResult(
        losses.index_copy_(0, running, part_losses),
        margin.index_copy_(2, running, part_margin),
        WindowArrays(
            [models_last(w) for w in weights],
            [models_last(a) for a in accum],
            new_state,
            arrays.lr,
            active,
        ),
    )


def _lanes_per_chunk(arrays: WindowArrays, x: torch.Tensor, pieces: TorchPieces) -> int:
    """How many lanes a chunk of a window x (B, T, K) takes (see CHUNK_GATE_TAPE_BYTES): all
    of them on a GPU, or where the pieces are not `chunked`."""
    models = len(arrays.active)
    w_hidden = arrays.weights[1]  # (H, 4H, K)
    if not pieces.chunked or w_hidden.device.type != "cpu":
        return models
    batch, steps = x.shape[:2]
    per_model = batch * steps * w_hidden.shape[1] * w_hidden.element_size()
    return max(1, CHUNK_GATE_TAPE_BYTES // per_model)


def _train_in_chunks(
    arrays: WindowArrays,
    x: torch.Tensor,
    y: torch.Tensor,
    pieces: TorchPieces,
    size: int,
    keep_inputs: bool,
) -> WindowResult:
    """train_window on chunks of at most `size` lanes, of even sizes, each through the whole
    window on views of the lanes' model-first storage, which it updates in place (on copies
    with `keep_inputs`); each chunk starts the scratch anew, so that every chunk runs on the
    same arrays, still in the caches."""
    first = _models_first_copy if keep_inputs else models_first
    weights, accum = [first(w) for w in arrays.weights], [first(a) for a in arrays.accum]
    state = [models_first(s) for s in arrays.state]
    results = []
    for lanes in lane_chunks(len(arrays.active), size):
        chunk = WindowArrays(
            [models_last(w[lanes]) for w in weights],
            [models_last(a[lanes]) for a in accum],
            State(*(models_last(s[lanes]) for s in state)),
            arrays.lr[lanes],
            arrays.active[lanes],
        )
        if pieces.scratch is not None:
            pieces.scratch.start()
        results.append(train_window(chunk, x[..., lanes], y[..., lanes], pieces))
    after = [result.arrays for result in results]
    return WindowResult(
        torch.cat([result.losses for result in results]),
        torch.cat([result.margin for result in results], dim=-1),
        WindowArrays(
            [models_last(w) for w in weights],
            [models_last(a) for a in accum],
            State(*(_joined([getattr(a.state, part) for a in after]) for part in State._fields)),
            arrays.lr,
            torch.cat([a.active for a in after]),
        ),
    )


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """Arrays in the lanes' layout (..., k), side by side along their model axis."""
    return models_last(torch.cat([models_first(part) for part in parts]))


def _models_first_copy(array: torch.Tensor) -> torch.Tensor:
    """`models_first`, always a copy."""
    return array.permute(-1, *range(array.dim() - 1)).clone(memory_format=torch.contiguous_format)


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
    scratch: Scratch | None = None,
) -> tuple[torch.Tensor, ...]:
    """One LSTM layer over a window, model first: w_input (K, I, 4H), w_hidden (K, H, 4H), bias
    (K, 4H), inputs (K, T, B, I), h, c (K, B, H) → a _LayerTape."""
    models, steps, batch, width = inputs.shape
    units = w_hidden.shape[1]
    tape_shape = (models, steps, batch, 4 * units)
    projected = empty(scratch, tape_shape, inputs)
    torch.baddbmm(
        bias.unsqueeze(1),
        inputs.reshape(models, steps * batch, width),
        w_input,
        out=projected.view(models, steps * batch, 4 * units),
    )
    # Step by step, laid out time first, so that a step's addend is one block: baddbmm copies
    # its addend, and a model-first slice cost its step a fifth more (state 64, K = 128). On
    # the CPU numpy's product is added after, where such a slice cost the add a tenth, about
    # what the copy costs: left as it is.
    by_step = empty(scratch, (steps, models, batch, 4 * units), inputs)
    by_step.copy_(projected.transpose(0, 1))
    hs = empty(scratch, (models, steps + 1, batch, units), inputs)
    cs = empty(scratch, hs.shape, inputs)
    hs[:, 0], cs[:, 0] = h, c
    gates = empty(scratch, tape_shape, inputs)
    tanh_c = empty(scratch, (models, steps, batch, units), inputs)
    # Each step's views, made in a few calls rather than a dozen per step.
    h_at, c_at, tanh_c_at = hs.unbind(1), cs.unbind(1), tanh_c.unbind(1)
    sigmoid_at, tanh_at = (part.unbind(1) for part in gates.split([3 * units, units], dim=-1))
    i_at, f_at, o_at, g_at = (
        gate.unbind(1) for gate in gates.view(models, steps, batch, 4, units).unbind(3)
    )
    step_out = empty(scratch, by_step.shape[1:], inputs)  # (K, B, 4H), each step's in turn
    for t, projected_t in enumerate(by_step):
        pre = matmul_add(projected_t, h_at[t], w_hidden, out=step_out)
        sigmoid_part, tanh_part = pre.split([3 * units, units], dim=-1)
        torch.sigmoid(sigmoid_part, out=sigmoid_at[t])
        tanh_into(tanh_part, out=tanh_at[t])
        torch.mul(f_at[t], c_at[t], out=c_at[t + 1]).addcmul_(i_at[t], g_at[t])
        tanh_into(c_at[t + 1], out=tanh_c_at[t])
        torch.mul(o_at[t], tanh_c_at[t], out=h_at[t + 1])
    return inputs, hs, cs, gates, tanh_c


def _plain_layer_forward(
    w_input: torch.Tensor,
    w_hidden: torch.Tensor,
    bias: torch.Tensor,
    inputs: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    scratch: None = None,
) -> tuple[torch.Tensor, ...]:
    """`_layer_forward` written plainly, step results stacked at the end: what autograd
    (`forward`) and torch.compile take, which refuse `out=` into a tape's slice. The same
    arithmetic, so the same bits on the CPU."""
    models, steps, batch, width = inputs.shape
    units = w_hidden.shape[1]
    flat = inputs.reshape(models, steps * batch, width)
    projected = torch.baddbmm(bias.unsqueeze(1), flat, w_input).view(models, steps, batch, -1)
    hs, cs, gates, tanh_c = [h], [c], [], []
    for projected_t in projected.unbind(1):
        pre = torch.baddbmm(projected_t, h, w_hidden)
        sigmoids, g = torch.sigmoid(pre[..., : 3 * units]), torch.tanh(pre[..., 3 * units :])
        i, f, o = sigmoids.split(units, dim=-1)
        c = (f * c).addcmul(i, g)
        tc = torch.tanh(c)
        h = o * tc
        hs.append(h)
        cs.append(c)
        gates.append(torch.cat([sigmoids, g], dim=-1))
        tanh_c.append(tc)
    return inputs, *(torch.stack(tape, dim=1) for tape in (hs, cs, gates, tanh_c))


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
    """Loss, output layer update (in place, model first: w_out (K, H, 2), b_out (K, 2)), which
    models still train, and the gradient flowing into the top LSTM layer's outputs (computed
    with the weights before the update). top (K, T, B, H), y (K, T, B)."""
    models, steps, batch, units = top.shape
    logits = _logits(w_out, b_out, top).view(models, steps * batch, 2)
    margin = logits[..., 1] - logits[..., 0]  # (K, TB)
    # Cross-entropy over two classes is softplus of the margin against the target: sign = +1
    # for target 0 and -1 for target 1.
    sign = 1.0 - 2.0 * y.reshape(models, steps * batch)
    signed = _rows_apart(margin).copy_(sign * margin)
    losses = F.softplus(signed).mean(dim=1)  # (K,)
    still = active & torch.isfinite(losses)
    d_margin = torch.sigmoid(signed).mul_(sign).div_(steps * batch)  # (K, TB)
    d_logits = torch.stack([-d_margin, d_margin], dim=-1)  # (K, TB, 2)
    d_top = torch.bmm(d_logits, w_out.transpose(1, 2)).view(models, steps, batch, units)
    flat_top = top.reshape(models, steps * batch, units)
    frozen = ~still
    adagrad_(w_out, accum_w, torch.bmm(flat_top.transpose(1, 2), d_logits), lr, frozen)
    adagrad_(b_out, accum_b, d_logits.sum(dim=1), lr, frozen)
    margin = margin.view(models, steps, batch).permute(2, 1, 0).contiguous()  # (B, T, K)
    return losses, margin, still, d_top


def _rows_apart(like: torch.Tensor) -> torch.Tensor:
    """An empty array shaped like `like` (K, N) whose rows lie apart in memory, so that torch
    runs an elementwise pass over it row by row, not as one run of K·N values: each model's
    row then ends in the same vectorized body and scalar tail whatever K, and sigmoid and
    softplus, whose scalar tail rounds otherwise than their body, give a model the same bits
    among any number of others."""
    models, width = like.shape
    return like.new_empty(models, width + 1)[:, :width]


EAGER = TorchPieces(_layer_forward, _head_update, layer_backward_update)


def eager_step() -> WindowStep:
    """torch's step without a compiler, with arrays of its own kept between its windows."""
    pieces = EAGER._replace(scratch=Scratch(), chunked=True)
    window = functools.partial(_torch_window, pieces=pieces, running_only=True)
    return WindowStep("eager", window)


@functools.cache
def inductor_step() -> WindowStep:
    """One torch.compile step per process, so that a Ray worker compiles once for all its
    tasks, and a compile that failed is not tried again. It works on copies of the lanes'
    arrays: a piece that fails to compile midway through a window leaves them as they were for
    the eager step that runs the window again."""
    window = functools.partial(_torch_window, pieces=compiled_pieces(), keep_inputs=True)
    return WindowStep("inductor", window, fallback=_eager_window)


def _eager_window(arrays: WindowArrays, x: torch.Tensor, y: torch.Tensor) -> WindowResult:
    return _torch_window(arrays, x, y, pieces=EAGER, running_only=True)


@torch.no_grad()  # the backward is written out: nothing needs autograd's graph
def _torch_window(
    arrays: WindowArrays,
    x: torch.Tensor,
    y: torch.Tensor,
    pieces: TorchPieces,
    keep_inputs: bool = False,
    running_only: bool = False,
) -> WindowResult:
    if pieces.scratch is not None:
        pieces.scratch.start()
    return train_window(arrays, x, y, pieces, keep_inputs, running_only)


@functools.cache
def compiled_pieces() -> TorchPieces:
    """The pieces compiled by torch.compile, with static shapes: torch compiles each piece
    once per state size and batch width and caches it on disk. The trainer pads batches to
    whole vectors (LANES), so the widths are few."""
    # Each state size, width and layer position is a version of a piece; torch's default of
    # 8 versions would silently send a wide study back to eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    pieces = (_plain_layer_forward, _head_update, layer_backward_update)
    return TorchPieces(*(_compile(piece) for piece in pieces))


def _compile(piece: Callable[..., tuple]) -> Callable[..., tuple]:
    # dynamic=False: torch would otherwise turn a size that changed between calls symbolic, so
    # that a kernel's code, and the losses, depended on what the process happened to run first.
    # A C++ wrapper allocates a kernel's many small buffers far faster than Python does.
    return torch.compile(piece, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
