"""Fixtures of the study tests."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import study_config
from tests.study.study_processes import SEED_BY_LR, TINY, losses_alone


@pytest.fixture(scope="session")
def seed_by_lr_losses(tmp_path_factory) -> dict[tuple, np.ndarray]:
    """The losses of SEED_BY_LR's grid points on TINY trials, each trained alone in this
    process: what every kill-and-rerun test's study must end with, bit for bit."""
    config = study_config(tmp_path_factory.mktemp("alone"), **TINY)
    return losses_alone(config, SEED_BY_LR)
