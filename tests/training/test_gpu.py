"""The torch step on a GPU, eager and compiled, against the numba step on the CPU.

Skipped where torch sees no CUDA device, as on CI and our machines: on a GPU machine, run
`python -m pytest tests/training/test_gpu.py`. These tests have not yet run on GPU hardware; the
tolerance is the CPU's (test_train.py: the eager step on the CPU is at most 7.6e-7 apart
relative from numba over 100 windows) with room for cuBLAS's and Triton's other summation
orders, and a first run on a GPU should replace it with what it measures.
"""

import numpy as np
import pytest
import torch

from pipeline.training.train import train
from tests.conftest import small_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


def _configs(device: str, compiled: bool, units: int) -> list:
    """Four trials of other seeds and echo steps, 3 layers, 100 windows (5 epochs of 20)."""
    return [
        small_config(**{"model.num_layers": 3, "model.state_size": units, "train.seed": s,
                        "task.echo_step": 1 + s, "train.epochs": 5, "train.device": device,
                        "train.compile": compiled})
        for s in range(4)
    ]  # fmt: skip


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("units", [16, 64])
def test_cuda_step_follows_the_numba_step_within_float32_rounding_for_100_windows(compiled, units):
    cuda_run = train(_configs("cuda", compiled, units))
    numba_run = train(_configs("cpu", True, units))
    # A compiled step that fell back to eager would pass the comparison and hide the failure.
    assert cuda_run.compiled == compiled and numba_run.compiled
    cuda_losses = np.stack([run.losses for run in cuda_run.runs])
    numba_losses = np.stack([run.losses for run in numba_run.runs])
    assert cuda_losses.shape == (4, 100)
    np.testing.assert_allclose(cuda_losses, numba_losses, rtol=1e-5, atol=0)
