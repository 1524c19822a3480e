"""What a window of lanes costs on the CPU, by the kernels that will run it: one cost model
for the driver's placement of trials (study/placement.py) and compile-ahead, the lanes'
padding, and the family of kernels a window shape runs first (cpu_step.py), before its race
measures both families and keeps the faster.

It has a module of its own so that the driver need not import torch or numba to place trials.
"""

from __future__ import annotations

from pipeline.config import ModelConfig

# The keys a trial's cost depends on (its windows, depth and width: see `lanes_window_cost`).
COST_KEYS = frozenset(
    {
        "task.series_length",
        "task.batch_size",
        "task.truncation",
        "train.epochs",
        "model.num_layers",
        "model.state_size",
    }
)


def models_to_vectorize_over(units: int) -> float:
    """The count of models from which the CPU kernels that vectorize over the models are
    expected to beat those that run one model at a time (a prior: the step races both on each
    window shape, cpu_step.Race). Vectorized over one model's gates, the latter's speed per
    model hardly depends on K; vectorized over the models, the former's grows with K.
    Measured on one core (3 layers, trainer rates, best of 6 runs, of 2 at state 32, after
    the one-model kernels gained their blocked sums), the two break even between K = 8 and 16
    at states 4 and 8 (by_model 1.07 and 1.44 times as fast at K = 8, by_lane 1.5 and 1.36 at
    K = 16), just above 64 at state 16 (by_model 1.04 times as fast there) and near 128 at
    state 32 (a tie; by_lane 1.16 times as fast at 256): K ≈ H² / 4 up to state 16, 4 H
    beyond (where a many-model window's tape outgrows the caches), and at least 8 (below
    that, the vector loops over the models of a chunk run mostly as their scalar tail)."""
    return max(8.0, min(units * units / 4, 4.0 * units))


# What a window of a set of lanes costs whatever its count of models (Python, the window's data,
# the kernels' calls), in the units of `lanes_window_cost` (layers × (H + 4)² per model). Fitted
# to the trainer's windows (bench/trainer.py, numba, 1 and 3 layers, states 4, 8 and 16, K = 1,
# 8 and 28, best of 3 on one core, 3 December 2026) as a + c × units: a = 290 µs, c = 0.17 µs,
# each window within 20 % (rms) of the fit; without a, K = 1 windows are 2-5 times their
# estimate. It is what two sets of one architecture pay that one set does not: at state 4, 1
# layer, a window of 28 models cost 592 µs, one of 1 cost 217 µs.
SET_WINDOW_OVERHEAD = 1700.0


def lanes_window_cost(model: ModelConfig, lanes: int) -> float:
    """What a window of `lanes` models of one architecture costs on the CPU, relative to other
    architectures and counts: the set's own overhead (`SET_WINDOW_OVERHEAD`), plus a model's
    matrix products, layers × (H + 4)², times the count of models, each counted whole up to
    `models_to_vectorize_over` and half beyond it, where the rate per model of the kernels
    vectorized over the models about doubles by K = 128. No lanes, no set: nothing."""
    if lanes <= 0:
        return 0.0
    switch = models_to_vectorize_over(model.state_size)
    effective = lanes if lanes <= switch else switch + (lanes - switch) / 2
    return SET_WINDOW_OVERHEAD + model.num_layers * (model.state_size + 4) ** 2 * effective
