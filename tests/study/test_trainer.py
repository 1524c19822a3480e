"""The trainer actor in a real Ray: trials of several architectures, with and without CPUs lent."""

from __future__ import annotations

import numpy as np
import ray

from pipeline.study.launch import Launch
from pipeline.study.trainer import start_trainer
from pipeline.training.trial import LaneTrial, lanes_key
from tests.conftest import small_config, train_alone


def _configs() -> list:
    """Six trials of three architectures (numba kernels on the CPU), of different lengths."""
    return [
        small_config(**{"train.compile": True, "model.num_layers": layers,
                        "model.state_size": units, "train.seed": seed, "train.epochs": 1 + seed})
        for layers, units in [(1, 4), (2, 4), (1, 8)]
        for seed in range(2)
    ]  # fmt: skip


def _train(lent: int) -> tuple[dict[int, np.ndarray], int]:
    """The trials' losses from a trainer actor lent `lent` CPUs, by trial, and the windows it
    stepped on the lent CPUs' threads."""
    configs = _configs()
    trainer = start_trainer(configs[0], Launch(None))
    ray.get(trainer.lend.remote(lent))
    admit = [LaneTrial(key, config) for key, config in enumerate(configs)]
    losses: dict[int, np.ndarray] = {}
    side_by_side = 0
    while len(losses) < len(configs):
        events = ray.get(trainer.exchange.remote(admit, {}, 1.0))
        admit = []
        assert not events.errors
        losses.update({finished.key: finished.losses for finished in events.finished})
        side_by_side += events.side_by_side
    ray.kill(trainer)
    return losses, side_by_side


def test_a_trainer_lent_cpus_steps_its_architectures_side_by_side_with_the_same_losses(
    ray_session,
):
    configs = _configs()
    assert len({lanes_key(config) for config in configs}) == 3
    alone = [train_alone(config) for config in configs]
    for lent in (0, 1):
        losses, side_by_side = _train(lent)
        # Lent a CPU, it steps its architectures on two threads at once; else on one.
        assert (side_by_side > 0) == (lent > 0)
        for key, want in enumerate(alone):
            assert len(losses[key]) == configs[key].total_steps
            assert np.array_equal(losses[key], want)


def test_trainer_whose_running_lanes_all_wait_for_a_verdict_sleeps(ray_session):
    config = small_config()  # eager torch: 16 lanes, all but one of them empty
    trainer = start_trainer(config, Launch(None), report_every=5, judge_from=0)
    try:
        events = ray.get(trainer.exchange.remote([LaneTrial(0, config)], {}, 60.0))
        while not events.reports:
            events = ray.get(trainer.exchange.remote([], {}, 60.0))
        waiting = ray.get(trainer.exchange.remote([], {}, 1.0))
        # Its one trial waits for a verdict: the trainer turns no loop until one comes...
        assert waiting.turns == 0 and not waiting.reports
        going_on = ray.get(trainer.exchange.remote([], {0: False}, 60.0))
        # ...and goes on when it comes.
        assert going_on.turns > 0
    finally:
        ray.kill(trainer)
