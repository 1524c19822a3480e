"""The samplers as the driver sets them up: a trial's draws come from the study's seed and the
trial's number, so an extended or resumed study asks new points; and a grid's trials, written
with their points. These tests also fail when an Optuna upgrade moves the private random states
the samplers reseed, or the study's storage that a grid's ask writes to."""

import json

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.study.asking import Asker
from pipeline.study.optuna_setup import (
    TrialSeededRandom,
    TrialSeededTPE,
    make_sampler,
    open_storage,
)
from tests.conftest import study_config

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


def test_a_grid_trial_is_written_with_its_point_in_one_entry_of_the_journal(tmp_path):
    # Optuna's ask with fixed distributions appends the trial, then each parameter, each append
    # under the journal's lock and synced to disk; the driver writes a grid's trial whole.
    config = study_config(tmp_path)  # a grid of 2 echo steps × 2 state sizes
    journal = tmp_path / "study.journal"
    study = optuna.create_study(
        storage=open_storage(str(journal)), study_name="grid", sampler=make_sampler(config)
    )
    asker = Asker(config, study)
    asker.start([])
    planned = [asker.ask(running=set()) for _ in range(4)]
    assert asker.ask(running=set()) is None
    trials = study.get_trials()
    assert [t.number for t in trials] == [p.number for p in planned] == [0, 1, 2, 3]
    assert {tuple(t.params.values()) for t in trials} == {p.point for p in planned}
    assert {(t.state, len(t.params)) for t in trials} == {(TrialState.RUNNING, 2)}
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    creations = [e for e in entries if "params" in e]
    assert len(creations) == 4 and len(entries) == 1 + 4  # the study, then one entry a trial
    study.tell(planned[0].number, 0.5)
    assert study.trials[0].state == TrialState.COMPLETE
