"""The register tiles and block transposes of kernel_tiles.py, through the kernels that use them."""

import numba
import numpy as np
import pytest

from pipeline.training import kernels
from pipeline.training.kernel_tiles import MAX_HEIGHT, TILE, VECTOR


@numba.njit
def _plain_chain(rows, values, out):
    """out[n, g] = fma(rows[R-1, g], values[n, R-1], ... fma(rows[0, g], values[n, 0], out)),
    one element at a time."""
    for n in range(out.shape[0]):
        for g in range(out.shape[1]):
            total = out[n, g]
            for r in range(rows.shape[0]):
                total = kernels._fma(rows[r, g], values[n, r], total)
            out[n, g] = total


# Heights below, at and above the tallest tile; widths of no whole tile, whole tiles, and tiles
# with columns left over; one term and many.
@pytest.mark.parametrize("height", [1, 4, MAX_HEIGHT, MAX_HEIGHT + 1, 2 * MAX_HEIGHT + 5])
@pytest.mark.parametrize(("terms", "width"), [(1, 3), (7, TILE), (9, 2 * TILE + 5), (64, 256)])
def test_block_shares_give_the_bits_of_a_plain_chain_of_fused_multiply_adds(height, terms, width):
    rng = np.random.default_rng(height * 1000 + terms * 10 + width)
    rows = rng.standard_normal((terms, width)).astype(np.float32)
    values = rng.standard_normal((height, terms)).astype(np.float32)
    start = rng.standard_normal((height, width)).astype(np.float32)
    tiled, plain = start.copy(), start.copy()
    kernels._add_block_shares(rows, values, tiled)
    _plain_chain(rows, values, plain)
    # Every element is one chain over the terms in order, whichever tile or tail computed it.
    assert tiled.tobytes() == plain.tobytes()


@numba.njit
def _fused(a, b, c):
    return kernels._fma(a, b, c)


def test_fma_rounds_once():
    a = np.float32(1 + 2**-23)
    # (1 + 2^-23)² = 1 + 2^-22 + 2^-46: less 1 + 2^-22 leaves 2^-46 rounded once, 0 twice.
    assert _fused(a, a, np.float32(-(1 + 2**-22))) == np.float32(2**-46)


# Shapes of no whole block, whole blocks only, and blocks with rows, columns or both left over;
# a layer's weights (H, 4H) and a window's rows of states (T B, H).
@pytest.mark.parametrize(
    "shape",
    [(1, 3), (3, 1), (VECTOR, VECTOR), (VECTOR + 5, VECTOR), (VECTOR, 2 * VECTOR + 3), (13, 20),
     (32, 128), (75, 32), (75, 1)],
)  # fmt: skip
def test_transpose_copies_every_float_to_its_place(shape):
    rows = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    columns = np.full(shape[::-1], np.nan, np.float32)
    kernels._transpose(rows, columns)
    assert columns.tobytes() == np.ascontiguousarray(rows.T).tobytes()
