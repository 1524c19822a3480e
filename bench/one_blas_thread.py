"""Importing this, before numpy, keeps numpy's BLAS (OpenBLAS) to one thread.

A benchmark of one core must: OpenBLAS spreads a product of a few hundred rows over every core
and spins its helper threads between calls, so a step that calls numpy's matmul would borrow the
second core (its CPU over wall time measured 1.9) while `torch.set_num_threads(1)` limits torch
alone. A value the caller set is kept. Import this first, ahead of numpy and torch.
"""

from __future__ import annotations

import os
import sys

if "numpy" in sys.modules:
    raise ImportError("one_blas_thread must be imported before numpy")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
