"""What a window of lanes costs on the CPU, by the kernels that will run it: one cost model
for the choice of kernels (model.py) and for the driver's placement of trials (study.py).

It has a module of its own so that the driver need not import torch (model.py) or numba
(kernels.py) to place trials.
"""

from __future__ import annotations

from pipeline.config import ModelConfig


def models_to_vectorize_over(units: int) -> float:
    """The count of models from which the CPU kernels that vectorize over the models beat
    those that run one model at a time. Vectorized over one model's gates, the latter's speed
    per model hardly depends on K; vectorized over the models, the former's grows with K.
    Measured on one core (3 layers, after both gained the eight-rows-per-pass sums), the two
    break even near K = 4 at state 4, 8 at state 8, 32 at state 16 and 128 at state 32:
    K ≈ H² / 8, but at least 4 (below that, the vector loops over the models of a chunk run
    mostly as their scalar tail: at state 4, K = 2 and 3, they ran at about 0.6 of the rate of
    one model at a time)."""
    return max(4.0, units * units / 8)


def lanes_window_cost(model: ModelConfig, lanes: int) -> float:
    """What a window of `lanes` models of one architecture costs on the CPU, relative to other
    architectures and counts: a model's matrix products, layers × (H + 4)², times the count of
    models, each counted whole up to `models_to_vectorize_over` and half beyond it, where the
    rate per model of the kernels vectorized over the models about doubles by K = 128."""
    switch = models_to_vectorize_over(model.state_size)
    effective = lanes if lanes <= switch else switch + (lanes - switch) / 2
    return model.num_layers * (model.state_size + 4) ** 2 * effective
