"""The driver's loop at its edges, with real Optuna studies and a real embedded Ray: a trial
run again after its trainer was lost, and Ray errors of lost nodes and objects."""

import threading

import optuna
import pytest
import ray

from pipeline.config import config_from_dict
from pipeline.results.output import Output
from pipeline.study.driver import _Driver
from pipeline.study.launch import Launch
from pipeline.study.optuna_setup import make_pruner
from pipeline.study.records import PlannedTrial, TrainerRecord
from pipeline.study.trainer import start_trainer
from pipeline.training.trial import Report
from tests.conftest import study_config


def _driver(tmp_path, **params: object) -> _Driver:
    """A driver of a random study (100 windows an epoch) over echo_step, its study in memory."""
    raw = study_config(tmp_path).to_dict()
    raw["study"].update(sampler="random", pruner="median", trials=8)
    raw["study"]["search"] = {"task.echo_step": {"low": 1, "high": 20}}
    config = config_from_dict(raw).with_params(params)
    study = optuna.create_study(pruner=make_pruner(config), direction="minimize")
    return _Driver(config, Launch(None), Output(config.output), study, progress=False)


def _completed(driver: _Driver, count: int, reports: dict[int, float]) -> None:
    """`count` finished trials of the study, each with `reports` (step → value)."""
    for _ in range(count):
        trial = driver.study.ask(driver.asker.distributions)
        for step, value in reports.items():
            trial.report(value, step)
        driver.study.tell(trial, value)


def _running(driver: _Driver) -> tuple[TrainerRecord, PlannedTrial]:
    """A trial asked through the driver, placed on a real trainer actor."""
    planned = driver.asker.ask(running=set())
    trainer = TrainerRecord(start_trainer(driver.config, driver.launch), 0.0)
    trainer.trials[planned.number] = planned
    driver.trainers.append(trainer)
    return trainer, planned


def _stop_trainers(driver: _Driver) -> None:
    for trainer in driver.trainers:
        ray.kill(trainer.actor)


def test_driver_judges_a_trial_run_again_on_its_own_attempts_reports(tmp_path, ray_session):
    driver = _driver(tmp_path, **{"ray.cpus_per_trainer": 2})
    _completed(driver, 5, {150: 1.0, 200: 0.1})
    trainer, planned = _running(driver)
    assert not driver._judge(Report(planned.number, 150, 1.0))  # as good as the others
    assert driver._judge(Report(planned.number, 200, 0.5))  # worse than every other: pruned
    try:
        driver._lost(trainer, "lost before the verdict came")
        # Run again, it is judged at step 150 on this attempt's report: its first attempt's
        # step 200, which this attempt has not reached, does not count.
        assert not driver._judge(Report(planned.number, 150, 1.0))
        assert driver.last_report[planned.number] == (150, 1.0)
    finally:
        _stop_trainers(driver)


@ray.remote(num_cpus=0)
class _Blocker:
    def wait(self) -> None:
        threading.Event().wait()


@ray.remote(num_cpus=0)
class _Owner:
    def hold(self, blocker) -> list:
        return [blocker.wait.remote()]


def test_driver_runs_again_the_trials_of_an_exchange_whose_owner_died(tmp_path, ray_session):
    driver = _driver(tmp_path, **{"ray.cpus_per_trainer": 2})
    trainer, planned = _running(driver)
    blocker, owner = _Blocker.remote(), _Owner.remote()
    [lost] = ray.get(owner.hold.remote(blocker))
    ray.kill(owner)
    trainer.call = lost  # an exchange whose result died with its owner
    try:
        driver._collect(trainer)
        # An object lost with its owner is a lost trainer: its trial runs again elsewhere.
        assert trainer not in driver.trainers
        assert [p.number for p in driver.queue] == [planned.number]
        # The trainer given up is killed, so that its CPUs go to the one in its place.
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(trainer.actor.where.remote(), timeout=60)
        with pytest.raises(ray.exceptions.OwnerDiedError):
            ray.get(lost)
    finally:
        _stop_trainers(driver)
        ray.kill(blocker)
