"""Fused multiply-adds and transposes for the numba kernels (kernels.py), written as LLVM IR:
numba has neither.

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

`transpose_blocks(rows, columns)` copies rows (R, C) into columns (C, R) in blocks of
VECTOR × VECTOR: each block's rows loaded as vectors, transposed in registers by shuffles,
stored as vectors. Written as numba loops, a transpose moved one float at a time, and the
scattered stores cost more than the arithmetic around them: the one-model backward
transposes its weights, and its inputs and states for the weight gradients, every window, and
with block transposes it took 105 µs a model-window rather than 140 at state 32, 519 rather
than 645 at state 64 (K = 8, 3 layers). A copy, so no bits to speak of.

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


_HALF = ir.VectorType(_FLOAT, VECTOR // 2)


@intrinsic
def transpose_blocks(typingctx, rows, columns):
    """columns[c, r] = rows[r, c] for every r and c in whole VECTOR × VECTOR blocks of rows
    (R, C), into columns (C, R); the rows and columns past the last whole block are left to
    the caller."""
    if not (rows == columns == _MATRIX):
        return None
    signature = types.void(rows, columns)

    def codegen(context, builder, signature, args):
        source, target = (
            context.make_array(kind)(context, builder, value)
            for kind, value in zip(signature.args, args, strict=True)
        )
        count, width = cgutils.unpack_tuple(builder, source.shape, 2)
        intp = count.type

        def pointer(kind, array, row, column, vector):
            item = cgutils.get_item_pointer(context, builder, kind, array, [row, column])
            return builder.bitcast(item, vector.as_pointer())

        with cgutils.for_range(builder, builder.udiv(count, intp(VECTOR))) as row_block:
            r0 = builder.mul(row_block.index, intp(VECTOR))
            with cgutils.for_range(builder, builder.udiv(width, intp(VECTOR))) as column_block:
                c0 = builder.mul(column_block.index, intp(VECTOR))

                def load_half(row, column):
                    at = pointer(
                        signature.args[0], source, builder.add(r0, intp(row)),
                        builder.add(c0, intp(column)), _HALF,
                    )  # fmt: skip
                    return builder.load(at, align=4)

                def store(column, vector):
                    row = builder.add(c0, intp(column))
                    at = pointer(signature.args[1], target, row, r0, _VECTOR)
                    builder.store(vector, at, align=4)

                _transpose_block(builder, load_half, store)
        return context.get_dummy_value()

    return signature, codegen


def _transpose_block(builder, load_half, store) -> None:
    """One 8 × 8 block: row i's halves paired with row i + 4's in one vector, so that a 4 × 4
    transpose within each 128-bit half gives whole columns (16 shuffles, none across halves)."""
    halves = VECTOR // 2
    for first in (0, halves):
        r0, r1, r2, r3 = (
            _shuffle(builder, load_half(i, first), load_half(i + halves, first), range(VECTOR))
            for i in range(halves)
        )
        low_01, high_01 = _unpack(builder, r0, r1)
        low_23, high_23 = _unpack(builder, r2, r3)
        for column, (a, b) in enumerate(((low_01, low_23), (high_01, high_23))):
            store(first + 2 * column, _shuffle(builder, a, b, [0, 1, 8, 9, 4, 5, 12, 13]))
            store(first + 2 * column + 1, _shuffle(builder, a, b, [2, 3, 10, 11, 6, 7, 14, 15]))


def _unpack(builder, a, b):
    """AVX's unpacklo and unpackhi: the pairs (a[0], b[0], a[1], b[1]) and (a[2], b[2], a[3],
    b[3]) of each 128-bit half."""
    low = _shuffle(builder, a, b, [0, 8, 1, 9, 4, 12, 5, 13])
    high = _shuffle(builder, a, b, [2, 10, 3, 11, 6, 14, 7, 15])
    return low, high


def _shuffle(builder, a, b, lanes):
    """The vector of `lanes` picked from a then b (LLVM's shufflevector)."""
    lanes = list(lanes)
    mask = ir.Constant(ir.VectorType(ir.IntType(32), len(lanes)), lanes)
    return builder.shuffle_vector(a, b, mask)
