"""The torch step's backward, written by hand: one LSTM layer back over a window, its weight
gradients summed over the window in one batched matmul each, and Adagrad in place; with the
scratch arrays that the eager step keeps from one window to the next.

Writing the backward by hand (rather than autograd) makes the truncation structural: it starts
every window with a zero gradient on the final state and never computes one for the initial
state, so no gradient crosses a window boundary and the carried state never holds a graph.
torch_step.py runs the forward and the head and calls these; tests/training/test_model.py
checks the update against autograd and Adagrad.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "Scratch",
    "adagrad_",
    "empty",
    "layer_backward_update",
    "matmul_add",
    "per_model",
    "tanh_into",
]


class Scratch:
    """The large arrays of a step's windows, kept from one window to the next: the i-th that a
    window asks for is the i-th of the window before where the shapes match. Fresh arrays of
    megabytes cost their pages' faults again at every window (state 64, K = 128: 10,000 to
    27,000 a window, a tenth of its time). Call `start` at each window."""

    def __init__(self) -> None:
        self.arrays: list[torch.Tensor] = []
        self.taken = 0

    def start(self) -> None:
        self.taken = 0

    def empty(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        at, self.taken = self.taken, self.taken + 1
        if at == len(self.arrays):
            self.arrays.append(like.new_empty(shape))
        kept = self.arrays[at]
        if kept.shape != shape or kept.dtype != like.dtype or kept.device != like.device:
            kept = self.arrays[at] = like.new_empty(shape)
        return kept


def empty(scratch: Scratch | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialized array: from `scratch`, or a fresh one (torch.compile's pieces)."""
    return like.new_empty(shape) if scratch is None else scratch.empty(shape, like)


def _eager_on_cpu(array: torch.Tensor) -> bool:
    """Whether work on `array` runs eagerly on the CPU, where this step lays it out for the
    caches and runs a step's products and tanh as numpy's (below); not on a GPU, nor under
    torch.compile, which traces torch alone and lays out its own loops."""
    return array.device.type == "cpu" and not torch.compiler.is_compiling()


def matmul_add(
    addend: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """addend + a·b per model (K, M, N), for a step's product (a: 5 rows a model). On the CPU
    it is numpy's matmul into `out`, on the same memory, then the sum: torch's `baddbmm`
    (MKL's batched GEMM) ran such products at 33-40 GFLOP/s on one core, numpy's (OpenBLAS,
    a GEMM per model) at 68-91, at states 32 to 128 (4 December 2026); for the window's
    larger products torch's `bmm` was as fast or faster, and they stay with it. numpy computes
    each model's product alone, so its bits do not depend on the models beside it. On a GPU,
    and under torch.compile (which traces torch alone), a fresh `baddbmm`, `out` unused."""
    if not _eager_on_cpu(out):
        return torch.baddbmm(addend, a, b)
    np.matmul(a.numpy(), b.numpy(), out=out.numpy())
    return out.add_(addend)


def tanh_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """tanh(x) into `out`. On the CPU numpy's: torch's took 53-66 µs on a (64, 5, 64) float32
    step of state 64, 2.8 ns a float where its sigmoid takes 0.4; numpy's vectorized one 7.7
    µs, within 1.2e-7 (relative) of the exact value, as torch's is within 7.4e-8 (4 December
    2026). On a GPU and under torch.compile, torch's."""
    if not _eager_on_cpu(out):
        return torch.tanh(x, out=out)
    np.tanh(x.numpy(), out=out.numpy())
    return out


def per_model(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) values shaped to broadcast over a model-first array like `like`."""
    return values.view(-1, *[1] * (like.dim() - 1))


def layer_backward_update(
    w_input: torch.Tensor,
    w_hidden: torch.Tensor,
    bias: torch.Tensor,
    accum_input: torch.Tensor,
    accum_hidden: torch.Tensor,
    accum_bias: torch.Tensor,
    inputs: torch.Tensor,
    hs: torch.Tensor,
    cs: torch.Tensor,
    gates: torch.Tensor,
    tanh_c: torch.Tensor,
    d_outputs: torch.Tensor,
    lr: torch.Tensor,
    frozen: torch.Tensor | None,
    needs_input_grad: bool,
    scratch: Scratch | None = None,
) -> torch.Tensor | None:
    """Backpropagate through one layer's window, update its weights and accumulators in place
    (model first), and return the gradient on its inputs (K, T, B, I), computed with the
    weights before the update (None without `needs_input_grad`)."""
    models, steps, batch, units = d_outputs.shape
    of_d_c, of_d_h = _gate_derivatives(gates, cs[:, :steps], tanh_c, scratch)
    hidden_t = w_hidden.transpose(1, 2)  # (K, 4H, H), a view
    if not _eager_on_cpu(hidden_t):
        # Laid out once, not at every step: a transposed operand cost torch's bmm a copy of it
        # per call. numpy's matmul reads it as it is (OpenBLAS packs either layout), as fast,
        # and the copy cost the eager step 2-3 % (state 64, K = 128).
        hidden_t = empty(scratch, hidden_t.shape, w_hidden).copy_(hidden_t)
    # d_pre (K, T, B, 4H) takes the place of the factors, step by step.
    d_pre = of_d_c.view(gates.shape)
    d_pre_at = d_pre.unbind(1)
    # Per gate, each step's slot; a mul per slot, as one broadcast over the slots ran an
    # elementwise loop of 4 (state 64, K = 128: 590 µs a step against 90 for the four).
    i_at, f_at, o_at, g_at = (slot.unbind(1) for slot in of_d_c.unbind(3))
    d_out_at, of_d_h_at = d_outputs.unbind(1), of_d_h.unbind(1)
    forget_at = gates[..., units : 2 * units].unbind(1)
    # The gradient flowing back through time starts at zero at the window's end...
    d_h = d_out_at[-1]
    d_c = d_h * of_d_h_at[-1]
    d_h_later = empty(scratch, d_h.shape, d_h)  # each step's, used within its step only
    for t in reversed(range(steps)):
        if t < steps - 1:
            d_h = matmul_add(d_out_at[t], d_pre_at[t + 1], hidden_t, out=d_h_later)
            d_c = torch.mul(d_c, forget_at[t + 1]).addcmul_(d_h, of_d_h_at[t])
        # d_pre: the gates' factors times d_c, but d_h for the output gate.
        for slot, by in ((i_at[t], d_c), (f_at[t], d_c), (o_at[t], d_h), (g_at[t], d_c)):
            slot.mul_(by)
    # ...and stops at its start: nothing is propagated into the initial state.
    flat = d_pre.view(models, steps * batch, 4 * units)
    d_inputs = None
    if needs_input_grad:
        d_inputs = torch.bmm(flat, w_input.transpose(1, 2)).view(models, steps, batch, -1)
    for v, weight, accum in (
        (inputs, w_input, accum_input),
        (hs[:, :steps], w_hidden, accum_hidden),
    ):
        _update_with_outer_sum(weight, accum, v, flat, lr, frozen, scratch)
    adagrad_(bias, accum_bias, flat.sum(dim=1), lr, frozen)
    return d_inputs


def _gate_derivatives(
    gates: torch.Tensor, c_prev: torch.Tensor, tanh_c: torch.Tensor, scratch: Scratch | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every step of the window at once, what the backward multiplies: the gates'
    pre-activation gradients per unit of d_c (K, T, B, 4, H), in slots i, f, o, g (slot o per
    unit of d_h instead), and d_c's share of d_h (K, T, B, H)."""
    models, steps, batch, four_units = gates.shape
    shape = (models, steps, batch, 4, four_units // 4)
    i, _, o, g = gates.view(shape).unbind(3)
    # σ' = σ (1 - σ) over all four slots, contiguous (slot g's is overwritten below). Each
    # 1 - x is one pass, where -x + 1 took two; the same bits.
    factors = torch.sub(1.0, gates, out=empty(scratch, gates.shape, gates))
    factors = factors.mul_(gates).view(shape)
    of_i, of_f, of_o, of_g = factors.unbind(3)
    of_i.mul_(g)  # ∂c/∂i = g
    of_f.mul_(c_prev)  # ∂c/∂f = c_prev
    of_o.mul_(tanh_c)  # ∂h/∂o = tanh c
    # In place, not out= into the slot: torch.compile takes no out= that is not contiguous.
    of_g.copy_(g).mul_(g).neg_().add_(1.0).mul_(i)  # tanh'(g) · ∂c/∂g
    of_d_h = torch.mul(tanh_c, tanh_c, out=empty(scratch, tanh_c.shape, tanh_c))
    return factors, torch.sub(1.0, of_d_h, out=of_d_h).mul_(o)  # tanh'(c) · ∂h/∂tanh c


# On the CPU a weight's gradient is computed and applied this many bytes of it at a time, so
# that Adagrad's passes over the gradient find it in the caches: over whole arrays (4 MB a
# weight at state 64 and 64 lanes) each pass streamed it from memory. Side by side, state 64,
# K = 128: 1.03-1.05 times as fast as whole (blocks of 0.25 MiB: 0.96-0.98; 2 MiB: as 1).
GRADIENT_BLOCK_BYTES = 2**20


def _update_with_outer_sum(
    weight: torch.Tensor,
    accum: torch.Tensor,
    v: torch.Tensor,
    d_pre: torch.Tensor,
    lr: torch.Tensor,
    frozen: torch.Tensor | None,
    scratch: Scratch | None,
) -> None:
    """Adagrad on `weight` (K, I, J) with its gradient, per model the sum over batch and time
    of v ⊗ d_pre: v (K, T, B, I), d_pre (K, TB, J). One bmm over the whole window, or on the
    CPU over blocks of models in turn (GRADIENT_BLOCK_BYTES), each block then updated."""
    models, steps, batch, width = v.shape
    flat = v.reshape(models, steps * batch, width)
    size = _models_per_block(weight) if _eager_on_cpu(weight) else models
    # One block's arrays, taken again by every block: they stay in the caches.
    grads, work = (empty(scratch, (size, *weight.shape[1:]), weight) for _ in range(2))
    for start in range(0, models, size):
        block = slice(start, min(start + size, models))
        grad = torch.bmm(flat[block].transpose(1, 2), d_pre[block], out=grads[: block.stop - start])
        block_frozen = None if frozen is None else frozen[block]
        adagrad_(weight[block], accum[block], grad, lr[block], block_frozen, work[: len(grad)])


def _models_per_block(weight: torch.Tensor) -> int:
    """How many models' gradients of `weight` (K, ...) make about GRADIENT_BLOCK_BYTES."""
    per_model = weight[0].numel() * weight.element_size()
    return max(1, min(len(weight), GRADIENT_BLOCK_BYTES // per_model))


def adagrad_(
    weight: torch.Tensor,
    accum: torch.Tensor,
    grad: torch.Tensor,
    lr: torch.Tensor,
    frozen: torch.Tensor | None,
    work: torch.Tensor | None = None,
) -> None:
    """TensorFlow's Adagrad (accum += g², w -= lr g / √accum), in place on model-first arrays,
    in the numba kernels' order of operations; `grad` is scratch, and so is `work`, an array
    shaped like them (None: a fresh one). Models `frozen` ((K,) bool, or None for none) keep
    their weights and accumulators: their gradient counts as zero."""
    if frozen is not None:
        grad.masked_fill_(per_model(frozen, grad), 0.0)
    accum.addcmul_(grad, grad)
    # w + (-(lr g)) / √accum: ten passes over the arrays, where a separate sub took thirteen.
    rsqrt = torch.rsqrt(accum, out=accum.new_empty(accum.shape) if work is None else work)
    weight.addcmul_(grad.mul_(per_model(lr, grad)), rsqrt, value=-1.0)
