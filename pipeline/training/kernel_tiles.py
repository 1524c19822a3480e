"""Fused multiply-adds for the numba kernels (kernels.py), written as LLVM IR: numba has none.

`fma(a, b, c)` is a × b + c with one rounding, one scalar. `TILE_SUMS[height]` adds a tile of
products in registers: out[n0 + m, g0:g0 + TILE] += Σ_r rows[r, g0:g0 + TILE] values[n0 + m, r]
for m below `height`, every tile of whole columns of `out`, the sums of each element one chain
of fused multiply-adds over r ascending. That is the shape of every sum of products in a
window of one model: the gates' pre-activations (rows: a layer's weights, values: a step's
batch rows of inputs), the gradients on h and on the inputs, and the weight gradients (rows:
the window's gradients on the gates, values: its inputs or states).

Why IR: written as numba loops, LLVM kept the running sums in memory, loading and storing
each one for every few products (measured: 41-47 GFLOP/s on one core, about half of what the
core's two FMA units allow). Here each tile's height × TILE sums stay in vector registers over
the whole sum, as a BLAS micro-kernel keeps them, and each vector of weights loaded serves
every row of the tile. Up to 6 rows × 16 columns: 12 vectors of sums, 2 of weights and one
of a broadcast value, 15 of AVX2's 16 vector registers.

The bits: every element is fma(rows[R-1], v[R-1], ... fma(rows[0], v[0], out)...), whichever
tile height or vector width computes it, and the columns left of whole tiles are summed by
the kernels in the same chain, so the result depends on no blocking (a test compares it with
a plain loop). `llvm.fma` is exactly rounded wherever it runs: one instruction on a CPU with
FMA (x86 since 2013's Haswell, every ARMv8), a slower library call on one without.

The cache of the kernels is keyed by this file's contents as well as kernels.py's
(kernel_cache.py): its IR is compiled into theirs.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

VECTOR = 8
"""Floats per vector: 256 bits, AVX's registers (LLVM splits them where a CPU has narrower)."""
VECTORS_PER_TILE = 2
TILE = VECTOR * VECTORS_PER_TILE
"""Columns of a tile."""
MAX_HEIGHT = 6
"""Rows of the tallest tile: its sums and operands fill 15 vector registers."""

_MATRIX = types.Array(types.float32, 2, "C")
_FLOAT = ir.FloatType()
_VECTOR = ir.VectorType(_FLOAT, VECTOR)


@intrinsic
def fma(typingctx, a, b, c):
    """a × b + c rounded once (llvm.fma.f32), for float32: without fastmath LLVM never fuses
    a × b + c by itself."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


def _tile_sums(height: int):
    """The intrinsic add_tiles(rows (R, G), values (N, R), out (N, G), n0): for the rows n0 to
    n0 + height of `out`, each whole tile of TILE columns += the products summed over r."""

    @intrinsic
    def add_tiles(typingctx, rows, values, out, n0):
        if not (rows == values == out == _MATRIX and isinstance(n0, types.Integer)):
            return None
        signature = types.void(rows, values, out, n0)

        def codegen(context, builder, signature, args):
            arrays = [
                context.make_array(kind)(context, builder, value)
                for kind, value in zip(signature.args[:3], args[:3], strict=True)
            ]
            first = context.cast(builder, args[3], signature.args[3], types.intp)
            _emit_tiles(context, builder, signature.args[:3], arrays, first, height)
            return context.get_dummy_value()

        return signature, codegen

    return add_tiles


def _emit_tiles(context, builder, kinds, arrays, first, height: int) -> None:
    """The loops of add_tiles: over tiles, then r, the sums in registers (stack slots that
    LLVM's mem2reg turns into registers)."""
    rows_kind, values_kind, out_kind = kinds
    rows, values, out = arrays
    count, width = cgutils.unpack_tuple(builder, rows.shape, 2)
    intp = count.type
    sums = [[cgutils.alloca_once(builder, _VECTOR) for _ in range(VECTORS_PER_TILE)]
            for _ in range(height)]  # fmt: skip
    out_rows = [builder.add(first, intp(m)) for m in range(height)]

    def vector_at(kind, array, row, column):
        pointer = cgutils.get_item_pointer(context, builder, kind, array, [row, column])
        return builder.bitcast(pointer, _VECTOR.as_pointer())

    tiles = builder.udiv(width, intp(TILE))
    with cgutils.for_range(builder, tiles) as tile:
        columns = [
            builder.add(builder.mul(tile.index, intp(TILE)), intp(v * VECTOR))
            for v in range(VECTORS_PER_TILE)
        ]
        for m in range(height):
            for v, column in enumerate(columns):
                loaded = builder.load(vector_at(out_kind, out, out_rows[m], column), align=4)
                builder.store(loaded, sums[m][v])
        with cgutils.for_range(builder, count) as term:
            weights = [
                builder.load(vector_at(rows_kind, rows, term.index, column), align=4)
                for column in columns
            ]
            for m in range(height):
                pointer = cgutils.get_item_pointer(
                    context, builder, values_kind, values, [out_rows[m], term.index]
                )
                value = _broadcast(builder, builder.load(pointer, align=4))
                for v in range(VECTORS_PER_TILE):
                    total = _vector_fma(builder, weights[v], value, builder.load(sums[m][v]))
                    builder.store(total, sums[m][v])
        for m in range(height):
            for v, column in enumerate(columns):
                target = vector_at(out_kind, out, out_rows[m], column)
                builder.store(builder.load(sums[m][v]), target, align=4)


def _broadcast(builder, scalar):
    """A vector of VECTOR copies of `scalar`."""
    lane = ir.IntType(32)
    single = builder.insert_element(ir.Constant(_VECTOR, ir.Undefined), scalar, lane(0))
    every_lane_the_first = ir.Constant(ir.VectorType(lane, VECTOR), [0] * VECTOR)
    return builder.shuffle_vector(single, single, every_lane_the_first)


def _vector_fma(builder, a, b, c):
    """a × b + c per lane, rounded once (llvm.fma.v8f32)."""
    # llvmlite's declare_intrinsic names no vector types: the declaration by hand.
    name = f"llvm.fma.v{VECTOR}f32"
    function = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(_VECTOR, [_VECTOR] * 3), name
    )
    return builder.call(function, [a, b, c])


TILE_SUMS = {height: _tile_sums(height) for height in range(1, MAX_HEIGHT + 1)}
"""The intrinsic add_tiles of each tile height."""
