"""The register tiles of kernel_tiles.py, through the kernels' one sum of products."""

import numba
import numpy as np
import pytest

from pipeline.training import kernels
from pipeline.training.kernel_tiles import MAX_HEIGHT, TILE


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
