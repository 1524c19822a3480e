"""The samplers as the driver sets them up: a trial's draws come from the study's seed and the
trial's number, so an extended or resumed study asks new points. These tests also fail when an
Optuna upgrade moves the private random states the samplers reseed."""

import optuna
import pytest

from pipeline.study.optuna_setup import TrialSeededRandom, TrialSeededTPE

SPACE = {
    "lr": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True),
    "seed": optuna.distributions.IntDistribution(0, 10**6),
}


def _asked(study: optuna.Study, count: int) -> list[dict]:
    """The parameters of `count` trials asked and told (a value from their parameters)."""
    points = []
    for _ in range(count):
        trial = study.ask(SPACE)
        study.tell(trial, trial.params["lr"] + trial.params["seed"] * 1e-7)
        points.append(trial.params)
    return points


@pytest.mark.parametrize("make", [TrialSeededRandom, TrialSeededTPE], ids=["random", "tpe"])
def test_sampler_draws_of_a_trial_depend_on_its_number_not_on_the_samplers_past(make):
    straight = optuna.create_study(sampler=make(seed=3))
    reference = _asked(straight, 14)
    # The same study run in two parts, each by a sampler that starts afresh (a resumed study).
    resumed = optuna.create_study(sampler=make(seed=3))
    first = _asked(resumed, 12)
    resumed.sampler = make(seed=3)
    second = _asked(resumed, 2)
    # Each trial draws what its number says: the second part goes on, it does not start over.
    assert first + second == reference
    assert second[0] != reference[0]
