"""Shared helpers: small configs that train in seconds on two cores."""

from __future__ import annotations

import pytest

from pipeline.config import Config, config_from_dict

# 1,500 values in 5 rows of 300 columns: 20 windows of 15 per epoch.
SMALL = {
    "task": {"series_length": 1500, "echo_step": 3, "batch_size": 5, "truncation": 15},
    "model": {"num_layers": 2, "state_size": 4},
    "train": {"epochs": 2, "lr": 0.3, "seed": 0, "compile": False, "device": "cpu"},
}


def small_config(**params: object) -> Config:
    """A config of a few dozen windows; `params` are dotted keys, e.g. {"train.seed": 1}."""
    return config_from_dict(SMALL).with_params({k.replace("__", "."): v for k, v in params.items()})


@pytest.fixture
def small() -> Config:
    return small_config()
