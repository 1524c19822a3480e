"""The CPU training step of K stacked LSTMs as numba kernels, compiled once per machine.

The same update as `model.train_window` (forward, the backward written out by hand, Adagrad),
written as plain loops, in two families. The first ("by_lane") takes the weights and state
as the lanes hold them, the model axis K innermost (..., K), so the loop over K reads
consecutive floats and LLVM turns it into vector code: fast with many small models. The second
("by_model", below) runs one model at a time, vectorized over its gates, from weights laid out
model first (K, ...): fast with a few models, and with wide ones. Each
kernel is compiled for one signature (float32 C-contiguous arrays of a fixed rank), so one
compile serves every number of layers, state size, batch, truncation and K; numba caches the
machine code on disk (see kernel_cache.py), so a machine compiles once and every later process,
Ray worker or job only loads it.

Same bits in any batch: no operation mixes two models, every sum runs over one model's values
in a fixed order, and nothing is compiled with fastmath, so the vector body and the scalar tail
of a loop over K round alike (IEEE +, ×, ÷, √ and fused multiply-add). Hence a model's
losses do not depend on K, on its index k, or on what the other models hold.

Every sum of products (the gates' pre-activations, the gradients reaching h and the inputs,
the weight gradients) is a chain of fused multiply-adds, acc = fma(w, v, acc), its terms in
ascending order: one rounding per term instead of two, and half the instructions. Both
families and every blocking of a sum build the same chain, so they give the same bits; the
one-model family's sums run in register tiles written as LLVM IR (kernel_tiles.py says why,
and that `fma` is exactly rounded on every CPU). The other operations stay unfused, as
written. The few library calls (exp, log1p in the loss) run in loops over one model's window
positions, never over K, so even a vectorized math library would treat every model alike.

Transcendentals: a call to math.tanh or math.exp in a loop stops LLVM from vectorizing it, so
the gates use `_tanh`, the rational approximation that Eigen (hence TensorFlow's own CPU LSTM)
and XLA use, which is pure arithmetic; sigmoid(x) = 0.5 + 0.5 tanh(x / 2).

The kernels are promised (LLVM's noalias) that no two arrays they are given overlap: callers
pass separate arrays, as `model.step_function`'s step does.

Importing this module compiles nothing; `compile_family` compiles (or loads) a family of
kernels, and raises when numba cannot compile, where the caller falls back to torch
(`model.numba_kernels`).
`NUMBA_DISABLE_JIT=1` counts as missing: interpreted, these loops would be about a thousand
times slower than eager torch.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from numba.core import caching

from pipeline.training.kernel_cache import FAMILY_NAMES, kernels_folder, source_hash
from pipeline.training.kernel_tiles import TILE, TILE_SUMS, VECTOR
from pipeline.training.kernel_tiles import fma as _fma
from pipeline.training.kernel_tiles import transpose_blocks as _transpose_blocks

if numba.config.DISABLE_JIT:
    raise ImportError("numba's JIT is disabled (NUMBA_DISABLE_JIT is set)")

# The register tiles of each height, as globals: numba resolves a global, not a dict lookup.
_TILES_1, _TILES_2, _TILES_3, _TILES_4, _TILES_5, _TILES_6 = (TILE_SUMS[h] for h in range(1, 7))

F32 = np.float32
ZERO, HALF, ONE = F32(0.0), F32(0.5), F32(1.0)
# Eigen's generic_fast_tanh_float (its FMA form): a 13/6-degree rational interpolant, the input
# clamped to where it reaches exactly ±1, and tanh(x) = x near 0 where the ratio loses bits.
TANH_CLAMP = F32(7.90531110763549805)
TANH_TINY = F32(0.0004)
# The numerator's odd coefficients, x^13 down to x^1, and the denominator's even ones.
A13, A11, A9 = F32(-2.76076847742355e-16), F32(2.00018790482477e-13), F32(-8.60467152213735e-11)
A7, A5 = F32(5.12229709037114e-08), F32(1.48572235717979e-05)
A3, A1 = F32(6.37261928875436e-04), F32(4.89352455891786e-03)
B6, B4 = F32(1.19825839466702e-06), F32(1.18534705686654e-04)
B2, B0 = F32(2.26843463243900e-03), F32(4.89352518554385e-03)


class _ContentCacheLocator(caching.UserProvidedCacheLocator):
    """Numba's cache locator for this module only, keyed by the source's contents, not its path
    (kernel_cache.py says why)."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._source_hash = source_hash()
        self._cache_path = str(kernels_folder())

    def get_source_stamp(self) -> str:
        return self._source_hash

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.realpath(py_file) != os.path.realpath(__file__):
            return None
        self = cls(py_func, py_file)
        try:
            self.ensure_cache_path()
        except OSError:
            return None  # an unwritable cache: numba tries its other locators
        return self


def _use_content_locator() -> None:
    # numba has no public hook for locators (CacheImpl was _CacheImpl before 0.61); where the
    # list is missing (another numba version), numba's own locators still cache, per path.
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    locators = getattr(impl, "_locator_classes", None)
    if isinstance(locators, list) and _ContentCacheLocator not in locators:
        locators.insert(0, _ContentCacheLocator)


_use_content_locator()

# Models per chunk: each kernel runs a whole layer for a chunk of models at a time, so that a
# chunk's weights and running sums stay in the core's caches. Long enough that the vector loops
# over it amortize their set-up (measured: chunks of 16 or 32 ran at half the speed of 128).
CHUNK = 128

_A2 = numba.types.Array(numba.float32, 2, "C")
_A3 = numba.types.Array(numba.float32, 3, "C")
_A4 = numba.types.Array(numba.float32, 4, "C")
_V = numba.types.Array(numba.float32, 1, "C")
_MASK = numba.types.Array(numba.boolean, 1, "C")
# The kernels' signatures, the same in both families.
_FORWARD = numba.void(_A3, _A3, _A2, _A4, _A3, _A3, _A4, _A4, _A4, _A4, _MASK)
_BACKWARD = numba.void(_A3, _A3, _A2, _A3, _A3, _A2, _A4, _A4, _A4, _A4, _A4, _A4, _A4, _V, _MASK)
_HEAD = numba.void(_A3, _A2, _A3, _A2, _A4, _A3, _V, _MASK, _V, _A3, _A4, _MASK)
# error_model="numpy": a division by zero gives inf like IEEE, instead of a check that raises
# ZeroDivisionError and keeps the loop from vectorizing.
_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


# The kernels of each family, registered by `_kernel`, compiled (or loaded from the cache) by
# `compile_family`: nothing compiles at import, so that processes starting together on a cold
# machine can each compile a different family at the same time (see model.numba_kernels).
FAMILIES: dict[str, list] = {name: [] for name in FAMILY_NAMES}


def _kernel(family: str, signature: numba.core.typing.Signature):
    """njit for one signature, in `family`, with the arrays it is given promised not to overlap
    (LLVM's noalias): without that promise LLVM checks for overlap before each inner loop, and
    those checks cost more than the short loops over K they guard."""

    def register(py_func):
        dispatcher = numba.njit(**_JIT)(py_func)
        _promise_no_alias(dispatcher)
        FAMILIES[family].append((dispatcher, signature))
        return dispatcher

    return register


def _row_helper(py_func):
    """njit for a helper over rows of one model or chunk, compiled as a function of its own so
    that its arrays, views into the caller's, are promised not to overlap (inlined, LLVM cannot
    tell and checks before every short loop), and so that it compiles once however many places
    call it (inlining the unrolled sums and Adagrad at each call site made the cold compile
    take about 30 % longer). Where the call costs more than the checks (a whole window's
    forward in one function ran slower than a call per row), helpers stay inlined: which is
    which was measured, per helper.

    Without numba's reference counting (_nrt=False): a helper never allocates, and counting
    each array it is given and each view it makes (an atomic increment and decrement, each
    through a call) took more time than a state-16 row's arithmetic (without it, the
    one-model forward ran 1.6 times as fast at state 16, twice at state 4). The caller holds
    every array the helper sees alive until it returns."""
    dispatcher = numba.njit(_nrt=False, **_JIT)(py_func)
    _promise_no_alias(dispatcher)
    return dispatcher


def _promise_no_alias(dispatcher) -> None:
    # numba has the flag (parfors set it) but no option for it; where this private hook is
    # missing (another numba version) the kernels still work, only slower.
    compiler = getattr(dispatcher, "_compiler", None)
    if compiler is not None and hasattr(compiler, "_customize_flags"):
        customize = compiler._customize_flags

        def with_noalias(flags):
            flags = customize(flags)
            flags.noalias = True
            return flags

        compiler._customize_flags = with_noalias


@numba.njit(numba.float32(*[numba.float32] * 9), **_JIT)
def _four_terms(acc, w0, v0, w1, v1, w2, v2, w3, v3):
    """acc + w0 v0 + w1 v1 + w2 v2 + w3 v3, left to right, each term a fused multiply-add: the
    chain that every sum of products in this module is made of (a function of its own, which
    LLVM inlines, as _tanh: it compiles once however many loops call it)."""
    return _fma(w3, v3, _fma(w2, v2, _fma(w1, v1, _fma(w0, v0, acc))))


# _tanh and _sigmoid are functions of their own, which LLVM inlines into the loops that call
# them before it vectorizes those loops: the same machine code and speed as numba's own
# inlining (inline="always"), which typed and lowered their bodies again at each of the dozen
# call sites and made the cold compile of both families take 1.1 s (11 %) longer.
@numba.njit(numba.float32(numba.float32), **_JIT)
def _tanh(x):
    """tanh by Eigen's rational approximation, pure arithmetic so that loops over it vectorize.

    Measured on 840,000 points in [-12, 12] and ±[1e-8, 10] (tests/training/test_model.py
    checks it): at most 4 ulp from the correctly rounded tanh (torch's own: 1 ulp; 5 before
    Horner's steps were fused); it returns ±1 from ±7.9 on. A NaN stays NaN: the clamps
    compare so that it passes through, and the trainer watches for NaN losses.
    """
    clamped = TANH_CLAMP if x > TANH_CLAMP else x
    clamped = -TANH_CLAMP if clamped < -TANH_CLAMP else clamped
    x2 = clamped * clamped
    # Horner's steps fused, as Eigen computes them where the CPU has FMA.
    p = _fma(A13, x2, A11)
    p = _fma(p, x2, A9)
    p = _fma(p, x2, A7)
    p = _fma(p, x2, A5)
    p = _fma(p, x2, A3)
    p = _fma(p, x2, A1)
    p = p * clamped
    q = _fma(B6, x2, B4)
    q = _fma(q, x2, B2)
    q = _fma(q, x2, B0)
    tiny = x < TANH_TINY and x > -TANH_TINY
    return x if tiny else p / q


@numba.njit(numba.float32(numba.float32), **_JIT)
def _sigmoid(x):
    """sigmoid(x) = 0.5 + 0.5 tanh(x / 2), exact algebra on the approximate tanh: an absolute
    error of at most 2.4e-7 (torch's: 6e-8), which is what a gate multiplying values of order
    one sees; relative to a tiny sigmoid (x < -5) the error is large, and harmless there.
    """
    return _fma(HALF, _tanh(HALF * x), HALF)


@numba.njit(inline="always", **_JIT)
def _unsigned_range(k0, n):
    """Bounds for `range` over models k0 to k0 + n with unsigned indices: numba checks a signed
    index for a negative (wrap-around) value, which keeps LLVM from vectorizing the loop."""
    return numba.uint64(k0), numba.uint64(k0 + n)


@_row_helper
def _add_lane_shares(weight, values, t_values, gates, t, lo, hi):
    """gates[:, t] (B, 4H, K) += Σ_r weight[r] values[:, t_values, r] for the lanes lo to hi,
    for weight (R, 4H, K) and values (B, ·, R, K): r ascending, eight rows per pass over the
    gates (the same chain of fused multiply-adds as one row at a time, with a quarter
    of the loads and stores), each row of weights read once for every b."""
    count = weight.shape[0]
    r = 0
    tv = t_values
    while count - r >= 8:
        for g in range(gates.shape[2]):
            for b in range(gates.shape[0]):
                for k in range(lo, hi):
                    first = _four_terms(
                        gates[b, t, g, k],
                        weight[r, g, k], values[b, tv, r, k],
                        weight[r + 1, g, k], values[b, tv, r + 1, k],
                        weight[r + 2, g, k], values[b, tv, r + 2, k],
                        weight[r + 3, g, k], values[b, tv, r + 3, k],
                    )  # fmt: skip
                    gates[b, t, g, k] = _four_terms(
                        first,
                        weight[r + 4, g, k], values[b, tv, r + 4, k],
                        weight[r + 5, g, k], values[b, tv, r + 5, k],
                        weight[r + 6, g, k], values[b, tv, r + 6, k],
                        weight[r + 7, g, k], values[b, tv, r + 7, k],
                    )  # fmt: skip
        r += 8
    for last in range(r, count):
        for g in range(gates.shape[2]):
            for b in range(gates.shape[0]):
                for k in range(lo, hi):
                    gates[b, t, g, k] = _fma(
                        weight[last, g, k], values[b, tv, last, k], gates[b, t, g, k]
                    )


@numba.njit(inline="always", **_JIT)
def _forward_chunk(w_input, w_hidden, bias, inputs, h0, c0, h_seq, c_seq, gates, tanh_c, k0, n):
    """layer_forward for models k0 to k0 + n."""
    batch, steps1 = inputs.shape[0], inputs.shape[1]
    units = w_hidden.shape[0]
    lo, hi = _unsigned_range(k0, n)
    for b in range(batch):
        for j in range(units):
            for k in range(lo, hi):
                h_seq[b, 0, j, k] = h0[b, j, k]
                c_seq[b, 0, j, k] = c0[b, j, k]
    for t in range(steps1 - 1):
        # The pre-activations, in place in `gates` until activated: bias, then each input
        # unit's and each hidden unit's share. Rows of weights are read once for every b.
        for b in range(batch):
            for g in range(4 * units):
                for k in range(lo, hi):
                    gates[b, t, g, k] = bias[g, k]
        _add_lane_shares(w_input, inputs, t + 1, gates, t, lo, hi)
        _add_lane_shares(w_hidden, h_seq, t, gates, t, lo, hi)
        for b in range(batch):
            pre = gates[b, t]  # (4H, K)
            for j in range(units):
                for k in range(lo, hi):
                    i = _sigmoid(pre[j, k])
                    f = _sigmoid(pre[units + j, k])
                    o = _sigmoid(pre[2 * units + j, k])
                    g = _tanh(pre[3 * units + j, k])
                    c = f * c_seq[b, t, j, k] + i * g
                    tc = _tanh(c)
                    pre[j, k], pre[units + j, k] = i, f
                    pre[2 * units + j, k], pre[3 * units + j, k] = o, g
                    c_seq[b, t + 1, j, k] = c
                    tanh_c[b, t, j, k] = tc
                    h_seq[b, t + 1, j, k] = o * tc


# The weight gradients of a chunk sum over the window's (t, b) rows, t descending, b ascending:
# the backward keeps the latest rows' d_pre, inputs and state, and adds them to the gradients
# ROWS_PER_PASS at a time (see _add_lane_products).
ROWS_PER_PASS = 8


@numba.njit(inline="always", **_JIT)
def _backward_chunk(
    w_input, w_hidden, bias, acc_input, acc_hidden, acc_bias,
    inputs, h_seq, c_seq, gates, tanh_c, d_outputs, d_inputs, lr, active, k0, n,
):  # fmt: skip
    """layer_backward_update for models k0 to k0 + n."""
    batch, steps, units, _ = d_outputs.shape
    width = w_input.shape[0]
    lo, hi = _unsigned_range(k0, n)
    # Running sums and the latest rows, for the chunk's models only (dense, so they stay in the
    # cache): d_pre, inputs and h entering the step of the latest rows of the window, row s
    # of the window (t descending, b ascending) at s % kept. Room for a whole step's rows (its
    # d_h needs them) and a pass's, a multiple of a pass so that each pass's rows are adjacent.
    kept = ROWS_PER_PASS * ((batch + ROWS_PER_PASS - 1) // ROWS_PER_PASS)
    d_pre = np.empty((kept, 4 * units, n), np.float32)
    x_rows = np.empty((kept, width, n), np.float32)
    h_rows = np.empty((kept, units, n), np.float32)
    d_h = np.zeros((batch, units, n), np.float32)
    d_c = np.zeros((batch, units, n), np.float32)
    grad_input = np.zeros((width, 4 * units, n), np.float32)
    grad_hidden = np.zeros((units, 4 * units, n), np.float32)
    grad_bias = np.zeros((4 * units, n), np.float32)
    for t in range(steps - 1, -1, -1):
        first = (steps - 1 - t) * batch  # this step's first row of the window
        for b in range(batch):
            row = (first + b) % kept
            for j in range(units):
                for k in range(lo, hi):
                    i, f = gates[b, t, j, k], gates[b, t, units + j, k]
                    o, g = gates[b, t, 2 * units + j, k], gates[b, t, 3 * units + j, k]
                    tc = tanh_c[b, t, j, k]
                    dh = d_outputs[b, t, j, k] + d_h[b, j, k - lo]
                    dc = d_c[b, j, k - lo] + dh * o * (ONE - tc * tc)
                    d_pre[row, j, k - lo] = dc * g * i * (ONE - i)
                    d_pre[row, units + j, k - lo] = dc * c_seq[b, t, j, k] * f * (ONE - f)
                    d_pre[row, 2 * units + j, k - lo] = dh * tc * o * (ONE - o)
                    d_pre[row, 3 * units + j, k - lo] = dc * i * (ONE - g * g)
                    d_c[b, j, k - lo] = dc * f
                    h_rows[row, j, k - lo] = h_seq[b, t, j, k]
            for i in range(width):
                for k in range(lo, hi):
                    x_rows[row, i, k - lo] = inputs[b, t + 1, i, k]
            if row % ROWS_PER_PASS == ROWS_PER_PASS - 1:  # a pass's worth of rows
                start = row + 1 - ROWS_PER_PASS
                _add_lane_products(d_pre, x_rows, h_rows, start, ROWS_PER_PASS, grad_input,
                                   grad_hidden, grad_bias)  # fmt: skip
        # The gradient reaching h from the step before; none flows past the window's start.
        if t > 0:
            for b in range(batch):
                _sum_lane_gates(w_hidden, d_pre, (first + b) % kept, d_h[b], 0, lo, hi)
        if d_inputs.shape[2]:
            for b in range(batch):
                _sum_lane_gates(w_input, d_pre, (first + b) % kept, d_inputs[b, t], lo, lo, hi)
    rows = steps * batch
    left = rows % ROWS_PER_PASS
    _add_lane_products(d_pre, x_rows, h_rows, (rows - left) % kept, left, grad_input,
                       grad_hidden, grad_bias)  # fmt: skip
    for i in range(width):
        _adagrad_rows(w_input[i], acc_input[i], grad_input[i], lr, active, k0, n)
    for j in range(units):
        _adagrad_rows(w_hidden[j], acc_hidden[j], grad_hidden[j], lr, active, k0, n)
    _adagrad_rows(bias, acc_bias, grad_bias, lr, active, k0, n)


@_row_helper
def _sum_lane_gates(weight, d_pre, row, out, out_k0, lo, hi):
    """out (R, ·) = Σ_g weight[:, g] d_pre[row, g] for the lanes lo to hi, from zero, the gates
    ascending: weight (R, 4H, K), d_pre (·, 4H, n) with lane k at k - lo, out with lane k at
    k - lo + out_k0. Eight gates per pass over `out`, then one at a time, one chain."""
    gate_rows = weight.shape[1]
    out_k0 = numba.uint64(out_k0)
    for r in range(weight.shape[0]):
        for k in range(lo, hi):
            out[r, k - lo + out_k0] = ZERO
        g = 0
        while gate_rows - g >= 8:
            for k in range(lo, hi):
                first = _four_terms(
                    out[r, k - lo + out_k0],
                    weight[r, g, k], d_pre[row, g, k - lo],
                    weight[r, g + 1, k], d_pre[row, g + 1, k - lo],
                    weight[r, g + 2, k], d_pre[row, g + 2, k - lo],
                    weight[r, g + 3, k], d_pre[row, g + 3, k - lo],
                )  # fmt: skip
                out[r, k - lo + out_k0] = _four_terms(
                    first,
                    weight[r, g + 4, k], d_pre[row, g + 4, k - lo],
                    weight[r, g + 5, k], d_pre[row, g + 5, k - lo],
                    weight[r, g + 6, k], d_pre[row, g + 6, k - lo],
                    weight[r, g + 7, k], d_pre[row, g + 7, k - lo],
                )  # fmt: skip
            g += 8
        for last in range(g, gate_rows):
            for k in range(lo, hi):
                out[r, k - lo + out_k0] = _fma(
                    weight[r, last, k], d_pre[row, last, k - lo], out[r, k - lo + out_k0]
                )


@numba.njit(inline="always", **_JIT)
def _add_lane_products(d_pre, x_rows, h_rows, start, count, grad_input, grad_hidden, grad_bias):
    """Add `count` rows of d_pre (·, 4H, n) from `start`, in order, to the weight gradients: each
    row's d_pre to grad_bias (4H, n), times its inputs x_rows (·, I, n) to grad_input (I, 4H,
    n) and times its state h_rows (·, H, n) to grad_hidden (H, 4H, n). A full pass adds
    eight rows to each element at once, left to right: the same order of
    additions as a row at a time, with an eighth of the gradients' loads and stores."""
    _add_rows_times(d_pre, x_rows, start, count, grad_input)
    _add_rows_times(d_pre, h_rows, start, count, grad_hidden)
    _, m = _unsigned_range(0, grad_bias.shape[1])
    for s in range(start, start + count):
        for g in range(grad_bias.shape[0]):
            for k in range(m):
                grad_bias[g, k] += d_pre[s, g, k]


@_row_helper
def _add_rows_times(d_pre, values, start, count, grad):
    """grad (R, 4H, n) += Σ_s values[s, r] d_pre[s] over `count` rows s from `start`, in order."""
    _, m = _unsigned_range(0, grad.shape[2])
    for r in range(grad.shape[0]):
        for g in range(grad.shape[1]):
            if count == ROWS_PER_PASS:
                for k in range(m):
                    first = _four_terms(
                        grad[r, g, k],
                        values[start + 0, r, k], d_pre[start + 0, g, k],
                        values[start + 1, r, k], d_pre[start + 1, g, k],
                        values[start + 2, r, k], d_pre[start + 2, g, k],
                        values[start + 3, r, k], d_pre[start + 3, g, k],
                    )  # fmt: skip
                    grad[r, g, k] = _four_terms(
                        first,
                        values[start + 4, r, k], d_pre[start + 4, g, k],
                        values[start + 5, r, k], d_pre[start + 5, g, k],
                        values[start + 6, r, k], d_pre[start + 6, g, k],
                        values[start + 7, r, k], d_pre[start + 7, g, k],
                    )  # fmt: skip
            else:
                for s in range(start, start + count):
                    for k in range(m):
                        grad[r, g, k] = _fma(values[s, r, k], d_pre[s, g, k], grad[r, g, k])


@_row_helper
def _adagrad_rows(weight, accum, grad, lr, active, k0, n):
    """TensorFlow's Adagrad (accum += g², w -= lr g / √accum) on rows (J, K) of models k0 to
    k0 + n, active ones only; grad (J, n) holds the chunk's gradients."""
    lo, hi = _unsigned_range(k0, n)
    for g in range(weight.shape[0]):
        for k in range(lo, hi):
            d = grad[g, k - lo]
            a = accum[g, k] + d * d
            w = weight[g, k] - lr[k] * d * (ONE / np.sqrt(a))
            accum[g, k] = a if active[k] else accum[g, k]
            weight[g, k] = w if active[k] else weight[g, k]


@numba.njit(inline="always", **_JIT)
def _loss_and_gradient(margin, y, losses):
    """Two-class cross-entropy as softplus(sign · margin), sign = +1 for target 0 and -1 for
    target 1: writes each model's mean into losses and returns d(mean)/d(margin) (B, T, K).
    In float64 with library exp and log1p, looping over one model's window positions (see the
    module docstring); softplus(z) = max(z, 0) + log1p(e) and sigmoid(z) = 1 / (1 + e) or
    e / (1 + e) share e = exp(-|z|)."""
    batch, steps, models = y.shape
    d_margin = np.empty((batch, steps, models), np.float32)
    for k in range(models):
        losses[k] = _model_loss_and_gradient(margin, y, k, d_margin)
    return d_margin


@numba.njit(inline="always", **_JIT)
def _model_loss_and_gradient(margin, y, k, d_margin):
    """_loss_and_gradient of model k alone: returns its loss, writes its d_margin[:, :, k]."""
    batch, steps, _ = y.shape
    count = batch * steps
    total = 0.0
    for b in range(batch):
        for t in range(steps):
            sign = 1.0 - 2.0 * np.float64(y[b, t, k])
            z = sign * np.float64(margin[b, t, k])
            e = np.exp(-abs(z))
            total += max(z, 0.0) + np.log1p(e)
            sigmoid = 1.0 / (1.0 + e) if z >= 0.0 else e / (1.0 + e)
            d_margin[b, t, k] = np.float32(sign * sigmoid / count)
    return np.float32(total / count)


@_kernel("by_lane", _FORWARD)
def layer_forward(w_input, w_hidden, bias, inputs, h0, c0, h_seq, c_seq, gates, tanh_c, active):
    """One LSTM layer over a window, K models at once, recording what its backward needs.

    w_input (I, 4H, K), w_hidden (H, 4H, K), bias (4H, K); inputs (B, T + 1, I, K), step t's
    input at [:, t + 1] (the layer below's h_seq, or the window's x); h0, c0 (B, H, K).
    Writes h_seq, c_seq (B, T + 1, H, K), the state entering each step then the final one at
    [:, T]; gates (B, T, 4H, K), i, f, o after the sigmoid and g after the tanh; tanh_c
    (B, T, H, K), tanh of the cell after each step; and the final state of the active models
    into h0 and c0, which the backward never reads (the others keep theirs).
    """
    models = inputs.shape[3]
    for k0 in range(0, models, CHUNK):
        n = min(CHUNK, models - k0)
        _forward_chunk(w_input, w_hidden, bias, inputs, h0, c0, h_seq, c_seq, gates, tanh_c, k0, n)
    last = inputs.shape[1] - 1
    for b in range(h0.shape[0]):
        for j in range(h0.shape[1]):
            for k in range(models):
                h0[b, j, k] = h_seq[b, last, j, k] if active[k] else h0[b, j, k]
                c0[b, j, k] = c_seq[b, last, j, k] if active[k] else c0[b, j, k]


@_kernel("by_lane", _BACKWARD)
def layer_backward_update(
    w_input, w_hidden, bias, acc_input, acc_hidden, acc_bias,
    inputs, h_seq, c_seq, gates, tanh_c, d_outputs, d_inputs, lr, active,
):  # fmt: skip
    """Backpropagate through one layer's window and update its weights with Adagrad.

    The tape is layer_forward's; d_outputs (B, T, H, K) is the loss's gradient on this layer's
    outputs. Writes d_inputs (B, T, I, K), the gradient on its inputs computed with the weights
    before the update (pass a (B, T, 0, K) array to skip it, as the first layer does). The
    gradient through time starts at zero at the window's end and stops at its start: nothing
    flows into the initial state, which is what makes the truncation structural.
    """
    models = d_outputs.shape[3]
    for k0 in range(0, models, CHUNK):
        n = min(CHUNK, models - k0)
        _backward_chunk(w_input, w_hidden, bias, acc_input, acc_hidden, acc_bias, inputs,
                        h_seq, c_seq, gates, tanh_c, d_outputs, d_inputs, lr, active,
                        k0, n)  # fmt: skip


@_kernel("by_lane", _HEAD)
def head_update(w_out, b_out, acc_w, acc_b, top, y, lr, active, losses, margin, d_top, still):
    """Loss, the output layer's Adagrad update, and the gradient into the top layer's outputs.

    w_out (H, 2, K), b_out (2, K); top (B, T + 1, H, K), the top layer's h_seq; y (B, T, K).
    Writes losses (K,), each model's mean cross-entropy over the window before the update;
    margin (B, T, K), logit 1 minus logit 0; d_top (B, T, H, K); and `still`, `active` less the
    models whose loss is not finite, which are the ones updated.
    """
    batch, steps, models = y.shape
    units = w_out.shape[0]
    logits = np.empty((2, models), np.float32)
    for b in range(batch):
        for t in range(steps):
            for k in range(models):  # a loop, not logits[:] = b_out: the shape check's
                logits[0, k] = b_out[0, k]  # error message alone takes seconds to compile
                logits[1, k] = b_out[1, k]
            for j in range(units):
                for k in range(models):
                    logits[0, k] += top[b, t + 1, j, k] * w_out[j, 0, k]
                    logits[1, k] += top[b, t + 1, j, k] * w_out[j, 1, k]
            for k in range(models):
                margin[b, t, k] = logits[1, k] - logits[0, k]
    d_margin = _loss_and_gradient(margin, y, losses)  # (B, T, K)
    for k in range(models):
        still[k] = active[k] and np.isfinite(losses[k])
    grad_w = np.zeros((units, 2, models), np.float32)
    grad_b = np.zeros((2, models), np.float32)
    for b in range(batch):
        for t in range(steps):
            for k in range(models):
                grad_b[0, k] -= d_margin[b, t, k]
                grad_b[1, k] += d_margin[b, t, k]
            for j in range(units):
                for k in range(models):
                    dm = d_margin[b, t, k]
                    d_top[b, t, j, k] = dm * w_out[j, 1, k] - dm * w_out[j, 0, k]
                    grad_w[j, 0, k] -= top[b, t + 1, j, k] * dm
                    grad_w[j, 1, k] += top[b, t + 1, j, k] * dm
    for j in range(units):
        _adagrad_rows(w_out[j], acc_w[j], grad_w[j], lr, still, 0, models)
    _adagrad_rows(b_out, acc_b, grad_b, lr, still, 0, models)


# One model at a time. The kernels above vectorize over the model axis, which needs many
# models: with a few (a first study's handful of trials per architecture) their vector loops run
# a short scalar tail. The kernels below loop over the models outermost and vectorize over the
# gates (4H) and units (H) of one model. They take the same weights and accumulators as above,
# but model first, (K, ...), each model's contiguous (cpu_step moves the lanes there, once,
# when these kernels take over): in the lanes' layout (..., K) a model's floats lie K apart,
# each on a cache line of its own at K = 128, and copying a model's weights out and Adagrad's
# strided updates took longer than its arithmetic (measured at state 64, 3 layers: a
# model-window took 2.2 times as long among 128 lanes as alone; model first, 128 models ran as
# fast per model as one). The state stays (B, H, K), as above: a model reads it once a window.
# Their tape is laid out model first too: inputs and h_seq, c_seq (K, B, T + 1, ·), tanh_c and
# d_outputs (K, B, T, H), and gates (K, T, B, 4H), time major, so that a step's rows are
# adjacent and their sums share each load of weights (_add_block_shares): only these kernels
# read it. Every value is summed in the order the kernels above sum it, so both give a model
# the same bits (tested): a trainer may switch between them as its count of models changes.
# Models that sit the window out are skipped, their losses NaN.


@_row_helper
def _transpose(rows, columns):
    """columns (C, R) = rows (R, C).T, for one model's weight or tape: whole blocks of VECTOR
    × VECTOR in registers (kernel_tiles.py), the rows and columns left over one float at a
    time."""
    _transpose_blocks(rows, columns)
    row_count, column_count = numba.uint64(rows.shape[0]), numba.uint64(rows.shape[1])
    whole_rows = row_count - row_count % numba.uint64(VECTOR)
    whole_columns = column_count - column_count % numba.uint64(VECTOR)
    for r in range(whole_rows, row_count):
        for col in range(column_count):
            columns[col, r] = rows[r, col]
    for r in range(whole_rows):
        for col in range(whole_columns, column_count):
            columns[col, r] = rows[r, col]


@_row_helper
def _add_block_shares(rows, values, out):
    """out[n] (G,) += Σ_r rows[r] values[n, r] for every n, for rows (R, G), values (N, R) and
    out (N, G), each element's sum a chain of fused multiply-adds over r ascending (see the
    module docstring). Whole tiles of 16 columns go to kernel_tiles' register tiles, up to six
    rows at a time, so that each vector of weights loaded serves them all; the columns past
    the last whole tile, one row at a time, in the same chain."""
    n, height = 0, out.shape[0]
    while height - n >= 6:
        _TILES_6(rows, values, out, n)
        n += 6
    left = height - n
    if left == 5:
        _TILES_5(rows, values, out, n)
    elif left == 4:
        _TILES_4(rows, values, out, n)
    elif left == 3:
        _TILES_3(rows, values, out, n)
    elif left == 2:
        _TILES_2(rows, values, out, n)
    elif left == 1:
        _TILES_1(rows, values, out, n)
    tiled, width = numba.uint64(out.shape[1] - out.shape[1] % TILE), numba.uint64(out.shape[1])
    if tiled < width:
        for m in range(height):
            row_out, row_values = out[m], values[m]
            for r in range(rows.shape[0]):
                v, row = row_values[r], rows[r]
                for g in range(tiled, width):
                    row_out[g] = _fma(row[g], v, row_out[g])


@_row_helper
def _cell_forward(pre, c, tanh_c, h_next, c_next, h_row):
    """One step of one batch row through the cell, from its pre-activations pre (4H,), which
    become the gates (i, f, o after the sigmoid, g after the tanh), as _forward_chunk does;
    the new state h goes to the tape (h_next) and to the next step's values (h_row). The gates
    first, in loops of their own, then the state: in one loop, each unit's sigmoids, tanh(g)
    and tanh(c) made one chain of dependent rational approximations, and a row of 32 units
    had too few such chains to keep the core busy (measured: the cell took a fifth of a
    state-32 model-window). The same operations on each value, so the same bits."""
    units = c.shape[0]
    for g in range(3 * units):
        pre[g] = _sigmoid(pre[g])
    for j in range(units):
        pre[3 * units + j] = _tanh(pre[3 * units + j])
    for j in range(units):
        cell = pre[units + j] * c[j] + pre[j] * pre[3 * units + j]
        tc = _tanh(cell)
        c_next[j] = cell
        tanh_c[j] = tc
        h_next[j] = pre[2 * units + j] * tc
        h_row[j] = pre[2 * units + j] * tc


@_row_helper
def _forward_model(w_in, w_h, b_in, inputs, h_seq, c_seq, gates, tanh_c, x_rows, h_rows):
    """One model's layer over the window, from h_seq[:, 0] and c_seq[:, 0]: w_in (I, 4H), w_h
    (H, 4H), b_in (4H,); inputs (B, T + 1, I), h_seq, c_seq (B, T + 1, H), tanh_c (B, T, H);
    gates (T, B, 4H), time major, so that a step's rows are adjacent and share each load of
    weights (_add_block_shares). The pre-activations sum as _forward_chunk sums them, bias,
    inputs, then hidden units; the inputs' shares of every step first, in one pass over w_in
    for the window's T B rows (they do not wait for the recurrence), so that each step reads
    only w_h: at state 128 a layer's two matrices (512 KB) no longer fit a core's L2 cache
    beside each other, and a step that read both streamed them from L3 (measured: the
    forward took twice its arithmetic). Scratch: x_rows (T B, I) the window's inputs and
    h_rows (B, H) the state entering a step, time major too."""
    batch, steps = h_rows.shape[0], tanh_c.shape[1]
    for b in range(batch):
        for j in range(h_rows.shape[1]):
            h_rows[b, j] = h_seq[b, 0, j]
    for t in range(steps):
        for b in range(batch):
            for i in range(x_rows.shape[1]):
                x_rows[t * batch + b, i] = inputs[b, t + 1, i]
            for g in range(gates.shape[2]):
                gates[t, b, g] = b_in[g]
    _add_block_shares(w_in, x_rows, gates.reshape((steps * batch, gates.shape[2])))
    for t in range(steps):
        pre = gates[t]  # (B, 4H)
        _add_block_shares(w_h, h_rows, pre)
        for b in range(batch):
            _cell_forward(
                pre[b], c_seq[b, t], tanh_c[b, t], h_seq[b, t + 1], c_seq[b, t + 1], h_rows[b]
            )


@numba.njit(inline="always", **_JIT)
def _gates_backward(gates, tanh_c, c, d_out, d_h, d_c, d_pre):
    """One step of one batch row back through the cell: d_pre (4H,) from the gates and the
    gradients on h and c, then d_c for the step before (as _backward_chunk computes them)."""
    units = d_h.shape[0]
    for j in range(units):
        i, f = gates[j], gates[units + j]
        o, g = gates[2 * units + j], gates[3 * units + j]
        tc = tanh_c[j]
        dh = d_out[j] + d_h[j]
        dc = d_c[j] + dh * o * (ONE - tc * tc)
        d_pre[j] = dc * g * i * (ONE - i)
        d_pre[units + j] = dc * c[j] * f * (ONE - f)
        d_pre[2 * units + j] = dh * tc * o * (ONE - o)
        d_pre[3 * units + j] = dc * i * (ONE - g * g)
        d_c[j] = dc * f


@_row_helper
def _backward_model(
    w_in_t, w_h_t, inputs, h_seq, c_seq, gates, tanh_c, d_outputs, d_inputs,
    d_pre, inputs_t, h_seq_t, h_rows, d_h, d_c, d_x, grad_input, grad_hidden, grad_bias,
):  # fmt: skip
    """One model's layer back over the window (as _backward_chunk): its weight gradients into
        grad_input (I, 4H), grad_hidden (H, 4H) and grad_bias (4H,), its input gradients into
        d_inputs (B, T, I). Scratch: d_pre (T B, 4H), the gradients on the pre-activations of
        every step and row in the order the weight gradients sum them (t descending, b
        ascending), with inputs_t (I, T B) and h_seq_t (H, T B), each step's inputs and state in
        that order, transposed from h_rows (T B, H) and d_x (T B, I), which hold them a row each
    first; d_h and d_c (B, H); d_x (T B, I) then the input gradients, rows as d_pre's. The
        weight gradients and the input gradients are summed after the recurrence, over the whole
        window, rather than at every step: the recurrence reads only w_h_t (see _forward_model),
        and each sum serves every row of the window with each load (_add_block_shares)."""
    batch, steps = d_outputs.shape[0], d_outputs.shape[1]
    for t in range(steps):
        first = (steps - 1 - t) * batch
        for b in range(batch):
            for i in range(d_x.shape[1]):
                d_x[first + b, i] = inputs[b, t + 1, i]
            for j in range(h_rows.shape[1]):
                h_rows[first + b, j] = h_seq[b, t, j]
    _transpose(d_x, inputs_t)
    _transpose(h_rows, h_seq_t)
    d_h[:], d_c[:] = ZERO, ZERO
    for t in range(steps - 1, -1, -1):
        first = (steps - 1 - t) * batch  # the step's first row of d_pre
        for b in range(batch):
            _gates_backward(
                gates[t, b], tanh_c[b, t], c_seq[b, t], d_outputs[b, t], d_h[b],
                d_c[b], d_pre[first + b],
            )  # fmt: skip
        # The gradient reaching h from the step before; none flows past the window's start.
        # Every row's d_pre first, then its sums, so that the step's rows share the weights.
        if t > 0:
            d_h[:] = ZERO
            _add_block_shares(w_h_t, d_pre[first : first + batch], d_h)
    if d_inputs.shape[2]:
        d_x[:] = ZERO
        _add_block_shares(w_in_t, d_pre, d_x)
        for t in range(steps):
            first = (steps - 1 - t) * batch
            for b in range(batch):
                for i in range(d_x.shape[1]):
                    d_inputs[b, t, i] = d_x[first + b, i]
    grad_bias[:] = ZERO
    for s in range(d_pre.shape[0]):
        for g in range(grad_bias.shape[0]):
            grad_bias[g] += d_pre[s, g]
    grad_input[:] = ZERO
    _add_block_shares(d_pre, inputs_t, grad_input)
    grad_hidden[:] = ZERO
    _add_block_shares(d_pre, h_seq_t, grad_hidden)


@_row_helper
def _adagrad_model(weight, accum, grad, lr):
    """_adagrad_rows for one model, on its contiguous weight and accum (R, C) and their grad:
    the same operations on each weight, so the same bits, in a vector loop over each row."""
    for r in range(weight.shape[0]):
        w, acc, d_row = weight[r], accum[r], grad[r]
        for g in range(w.shape[0]):
            d = d_row[g]
            a = acc[g] + d * d
            w[g] = w[g] - lr * d * (ONE / np.sqrt(a))
            acc[g] = a


@_kernel("by_model", _FORWARD)
def layer_forward_by_model(
    w_input, w_hidden, bias, inputs, h0, c0, h_seq, c_seq, gates, tanh_c, active
):  # fmt: skip
    """layer_forward of the active models, one at a time, from weights model first (K, I, 4H),
    (K, H, 4H) and (K, 4H), on a model-first tape: inputs (K, B, T + 1, I); writes h_seq,
    c_seq (K, B, T + 1, H), gates (K, T, B, 4H: time major, see above) and tanh_c (K, B, T,
    H), and the window's final state into h0 and c0 (B, H, K), which the backward never
    reads."""
    models, width = w_input.shape[0], w_input.shape[1]
    units = w_hidden.shape[1]
    batch, steps1 = inputs.shape[1], inputs.shape[2]
    x_rows = np.empty(((steps1 - 1) * batch, width), np.float32)
    h_rows = np.empty((batch, units), np.float32)
    for k in range(models):
        if not active[k]:
            continue
        for b in range(batch):
            for j in range(units):
                h_seq[k, b, 0, j] = h0[b, j, k]
                c_seq[k, b, 0, j] = c0[b, j, k]
        _forward_model(
            w_input[k], w_hidden[k], bias[k], inputs[k], h_seq[k], c_seq[k], gates[k],
            tanh_c[k], x_rows, h_rows,
        )  # fmt: skip
        for b in range(batch):
            for j in range(units):
                h0[b, j, k] = h_seq[k, b, steps1 - 1, j]
                c0[b, j, k] = c_seq[k, b, steps1 - 1, j]


@_row_helper
def _head_logits(w_cols, bias, top_t, logits):
    """logits[c, s] = bias[c] + Σ_j top_t[j, s] w_cols[c, j] for each class c and window
    position s, over j ascending, a product and a sum each, as head_update sums them; one
    position per lane of a vector (top_t (H, T B) holds the positions' states as columns),
    where a position at a time was one chain of dependent sums."""
    for c in range(2):
        out = logits[c]
        for s in range(out.shape[0]):
            out[s] = bias[c]
        for j in range(top_t.shape[0]):
            w, row = w_cols[c, j], top_t[j]
            for s in range(out.shape[0]):
                out[s] += row[s] * w


@_row_helper
def _head_gradients(d_margin, w_cols, top_rows, d_top_rows, grad_cols):
    """For each window position s in order (d_margin (T B,), top_rows and d_top_rows (T B,
    H)): the gradient into the top layer's outputs, and its share of the output weights'
    gradient, grad_cols (2, H), summed as head_update sums them; the columns of the weights
    and gradients a row each, so that the loop over units reads and writes whole vectors."""
    for s in range(d_margin.shape[0]):
        dm, top, d_top = d_margin[s], top_rows[s], d_top_rows[s]
        for j in range(top.shape[0]):
            d_top[j] = dm * w_cols[1, j] - dm * w_cols[0, j]
            grad_cols[0, j] -= top[j] * dm
            grad_cols[1, j] += top[j] * dm


@_kernel("by_model", _HEAD)
def head_update_by_model(
    w_out, b_out, acc_w, acc_b, top, y, lr, active, losses, margin, d_top, still
):  # fmt: skip
    """head_update of the active models, one at a time: w_out and acc_w (K, H, 2), b_out and
    acc_b (K, 2), top (K, B, T + 1, H) and d_top (K, B, T, H) are model first; y and margin
    (B, T, K) as in head_update. An inactive model's entries of losses, margin and `still`
    are left as they are: cpu_step fills them NaN (False for `still`) first. Positions s = b T
    + t run in head_update's order (b, then t)."""
    batch, steps, models = y.shape
    units = w_out.shape[1]
    positions = batch * steps
    d_margin = np.empty((batch, steps, models), np.float32)
    top_rows = np.empty((positions, units), np.float32)
    top_t = np.empty((units, positions), np.float32)
    logits = np.empty((2, positions), np.float32)
    d_margin_rows = np.empty(positions, np.float32)
    w_cols = np.empty((2, units), np.float32)
    grad_cols = np.empty((2, units), np.float32)
    grad_w = np.empty((units, 2), np.float32)
    grad_b = np.empty((1, 2), np.float32)
    for k in range(models):
        if not active[k]:
            continue
        w = w_out[k]
        for j in range(units):
            w_cols[0, j], w_cols[1, j] = w[j, 0], w[j, 1]
        for b in range(batch):
            for t in range(steps):
                for j in range(units):
                    top_rows[b * steps + t, j] = top[k, b, t + 1, j]
        _transpose(top_rows, top_t)
        _head_logits(w_cols, b_out[k], top_t, logits)
        for b in range(batch):
            for t in range(steps):
                margin[b, t, k] = logits[1, b * steps + t] - logits[0, b * steps + t]
        losses[k] = _model_loss_and_gradient(margin, y, k, d_margin)
        still[k] = np.isfinite(losses[k])
        if not still[k]:
            continue
        grad_b[:] = ZERO
        for b in range(batch):
            for t in range(steps):
                dm = d_margin[b, t, k]
                d_margin_rows[b * steps + t] = dm
                grad_b[0, 0] -= dm
                grad_b[0, 1] += dm
        grad_cols[:] = ZERO
        _head_gradients(
            d_margin_rows, w_cols, top_rows, d_top[k].reshape((positions, units)), grad_cols
        )
        for j in range(units):
            grad_w[j, 0], grad_w[j, 1] = grad_cols[0, j], grad_cols[1, j]
        _adagrad_model(w, acc_w[k], grad_w, lr[k])
        _adagrad_model(b_out[k : k + 1], acc_b[k : k + 1], grad_b, lr[k])


@_kernel("by_model", _BACKWARD)
def layer_backward_update_by_model(
    w_input, w_hidden, bias, acc_input, acc_hidden, acc_bias,
    inputs, h_seq, c_seq, gates, tanh_c, d_outputs, d_inputs, lr, active,
):  # fmt: skip
    """layer_backward_update of the active models, one at a time, on layer_forward_by_model's
    tape, with its weights and accumulators model first; d_outputs (K, B, T, H) and d_inputs
    (K, B, T, I) are model first."""
    models, width, gate_rows = w_input.shape
    units = w_hidden.shape[1]
    batch = d_outputs.shape[1]
    w_in_t = np.empty((gate_rows, width), np.float32)
    w_h_t = np.empty((gate_rows, units), np.float32)
    steps = d_outputs.shape[2]
    d_pre = np.empty((steps * batch, gate_rows), np.float32)
    inputs_t = np.empty((width, steps * batch), np.float32)
    h_seq_t = np.empty((units, steps * batch), np.float32)
    h_rows = np.empty((steps * batch, units), np.float32)
    d_h = np.empty((batch, units), np.float32)
    d_c = np.empty((batch, units), np.float32)
    d_x = np.empty((steps * batch, width), np.float32)
    grad_input = np.empty((width, gate_rows), np.float32)
    grad_hidden = np.empty((units, gate_rows), np.float32)
    grad_bias = np.empty((1, gate_rows), np.float32)
    for k in range(models):
        if not active[k]:
            continue
        _transpose(w_input[k], w_in_t)
        _transpose(w_hidden[k], w_h_t)
        _backward_model(
            w_in_t, w_h_t, inputs[k], h_seq[k], c_seq[k],
            gates[k], tanh_c[k], d_outputs[k],
            d_inputs[k], d_pre, inputs_t, h_seq_t, h_rows, d_h, d_c, d_x, grad_input, grad_hidden,
            grad_bias[0],
        )  # fmt: skip
        _adagrad_model(w_input[k], acc_input[k], grad_input, lr[k])
        _adagrad_model(w_hidden[k], acc_hidden[k], grad_hidden, lr[k])
        _adagrad_model(bias[k : k + 1], acc_bias[k : k + 1], grad_bias, lr[k])
