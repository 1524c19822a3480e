"""Faults injected for real: Ray workers and drivers killed by PID, a diverging loss, two
studies racing for one output, and bad input of every kind."""

import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import psutil
import pytest
import yaml

from pipeline.__main__ import main
from pipeline.config import ConfigError, config_from_dict
from pipeline.results.failpoints import TRAINER_FAILPOINT
from pipeline.results.output import Output, claim_output
from pipeline.results.record import TrialResult, record_trials
from pipeline.results.tables import read_steps_outcomes
from pipeline.study.driver import run_study
from pipeline.study.optuna_setup import JOURNAL
from tests.conftest import study_config
from tests.study.study_processes import (
    SEED_BY_LR,
    TINY,
    kill_at_every_moment,
    losses_by_point,
    reap,
    study_process,
    write_config,
)

TWO_BY_TWO = {"task.echo_step": [1, 20], "train.seed": [0, 1]}
# The trainer of trial 0 kills its own Ray worker after 50 of the trial's 200 windows, while
# its other trial (two lanes a trainer) trains beside it.
KILL_TRIAL_0 = "trial:0:windows:50"


def _optuna_trials(config):
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(Output(config.output).path(JOURNAL))
    )
    return optuna.load_study(study_name=config.study.name, storage=storage).trials


def _visible_and_hidden(steps: Path) -> tuple[list[str], list[str]]:
    names = sorted(p.name for p in steps.iterdir())
    return [n for n in names if not n.startswith(".")], [n for n in names if n.startswith(".")]


def test_faults_killed_trainer_has_its_trials_run_again_and_recorded_once(
    tmp_path, ray_session, monkeypatch
):
    monkeypatch.setenv(TRAINER_FAILPOINT, KILL_TRIAL_0)
    config = study_config(tmp_path, search=TWO_BY_TWO, **{"study.lanes_per_trainer": 2})
    outcome = run_study(config, progress=False)
    # The fault happened: both trials of the lost trainer were placed again (ray.max_retries 2).
    assert outcome.run_again == 2
    # They ran again elsewhere: all completed, once, with every step once.
    assert outcome.counts == {"COMPLETE": 4}
    steps = pd.read_parquet(config.output + "/steps")
    assert steps.groupby("trial")["step"].apply(sorted).to_dict() == {
        trial: list(range(200)) for trial in range(4)
    }
    visible, hidden = _visible_and_hidden(tmp_path / "study" / "steps")
    assert visible and hidden == []
    assert [t.state.name for t in _optuna_trials(config)] == ["COMPLETE"] * 4


def test_faults_killed_trainer_past_its_retries_fails_its_trials_and_the_study_goes_on(
    tmp_path, ray_session, monkeypatch
):
    monkeypatch.setenv(TRAINER_FAILPOINT, KILL_TRIAL_0)
    config = study_config(
        tmp_path, search=TWO_BY_TWO, **{"study.lanes_per_trainer": 2, "ray.max_retries": 0}
    )
    outcome = run_study(config, progress=False)
    # With no retry, the lost trainer's two trials, trial 0 among them, are FAIL; none ran again.
    assert outcome.run_again == 0
    assert outcome.counts == {"FAIL": 2, "COMPLETE": 2}
    trials = pd.read_parquet(config.output + "/trials.parquet")
    failed = trials[trials["state"] == "FAIL"]
    assert 0 in set(failed["trial"])
    assert failed["error"].str.contains("Worker|worker|died", regex=True).all()
    assert (failed["steps"] == 0).all() and (failed["status"] == "error").all()
    recorded = read_steps_outcomes(Output(config.output))
    assert sorted(recorded) == [0, 1, 2, 3]


def test_faults_diverging_loss_fails_its_trial_while_its_batch_goes_on(tmp_path, ray_session):
    # Adagrad steps by about lr, so lr = 1e38 overflows float32 at the second window in eager
    # torch's loss. (The numba kernels' loss can stay finite, near 1e37, for some seeds.)
    config = study_config(
        tmp_path,
        search={"train.lr": [0.3, 1e38], "task.echo_step": [1, 2]},
        **{"train.compile": False},
    )
    outcome = run_study(config, progress=False)
    assert outcome.counts == {"COMPLETE": 2, "FAIL": 2}
    trials = pd.read_parquet(config.output + "/trials.parquet").set_index("trial")
    steps = pd.read_parquet(config.output + "/steps")
    for trial, row in trials.iterrows():
        losses = steps.loc[steps["trial"] == trial, "loss"].to_numpy()
        if row["lr"] > 1:
            assert row["state"] == "FAIL" and row["status"] == "diverged"
            assert row["error"] == f"diverged at step {len(losses) - 1}"
            assert not np.isfinite(losses[-1]) and np.isfinite(losses[:-1]).all()
        else:
            assert row["state"] == "COMPLETE" and len(losses) == 200
            assert np.isfinite(losses).all()


def _wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_faults_driver_killed_at_every_moment_ends_with_the_losses_of_each_point_alone(
    tmp_path, seed_by_lr_losses
):
    config = study_config(tmp_path, search=SEED_BY_LR, **TINY)
    path, output = write_config(tmp_path, config), tmp_path / "killed"
    runs = kill_at_every_moment(path, output)
    # Killed the moment it asked for its third trial (two trainers of one lane), it had
    # recorded the first, recorded at once, and maybe the second.
    assert runs[0].failpoint == "asked:3" and 1 <= runs[0].recorded <= 2
    trials = pd.read_parquet(output / "trials.parquet")
    # Every grid point exactly once, with the very losses it gives trained alone.
    assert len(trials) == 9 and (trials["state"] == "COMPLETE").all()
    assert not trials.duplicated(["seed", "lr"]).any()
    killed = losses_by_point(pd.read_parquet(output / "steps"), ["seed", "lr"])
    assert killed.keys() == seed_by_lr_losses.keys()
    for point, losses in seed_by_lr_losses.items():
        assert np.array_equal(killed[point], losses), point
    # The trials the dead drivers left running were marked FAIL, and their points ran again.
    states = Counter(t.state.name for t in _optuna_trials(config.with_params(
        {"output": str(output)})))  # fmt: skip
    assert states["COMPLETE"] == 9 and states["FAIL"] >= 1
    assert any("left running by a stopped study" in run.err for run in runs[1:])


def test_faults_trial_written_but_not_told_is_completed_from_its_steps(tmp_path, ray_session):
    config = study_config(tmp_path, search={"task.echo_step": [1, 20]})
    output = Output(config.output)
    # The state a driver killed between writing a trial's steps and telling Optuna leaves.
    claim_output(output, config)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(output.path(JOURNAL))
    )
    study = optuna.create_study(storage=storage, study_name=config.study.name)
    study.enqueue_trial({"echo_step": 20})
    trial = study.ask()
    trial.suggest_categorical("echo_step", [1, 20])
    losses = np.full(200, 0.69, np.float32)
    columns = {"num_layers": 1, "state_size": 4, "echo_step": 20, "lr": 0.3}
    trial_config = config.with_params({"task.echo_step": 20})
    record_trials(output, [TrialResult(0, trial_config, columns, losses, "complete")])

    outcome = run_study(config, progress=False)
    assert outcome.ran == 1 and outcome.counts == {"COMPLETE": 2}
    trials = _optuna_trials(config)
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert trials[0].value == pytest.approx(0.69)
    assert trials[1].params == {"echo_step": 1}


def test_faults_second_study_into_a_busy_output_is_refused(tmp_path):
    config = study_config(tmp_path, search=TWO_BY_TWO)
    path, output = write_config(tmp_path, config), tmp_path / "study"
    # The first study stops itself once it asked for its first trial, holding the output's
    # lock until it is let go on, however long the second takes to start.
    first = study_process(path, output, failpoint="asked:1:stop")
    try:
        _wait_for(lambda: psutil.Process(first.pid).status() == psutil.STATUS_STOPPED)
        # While it runs, its embedded Ray listens on the loopback interface only.
        addresses = {c.laddr.ip for p in psutil.Process(first.pid).children(recursive=True)
                     for c in _listening(p)}  # fmt: skip
        assert addresses and addresses <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, addresses
        second = study_process(path, output)
        _, err = second.communicate(timeout=120)
        reap(second)
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 2
        assert err.strip().splitlines()[-1].startswith("error: output")
        assert "in use by another running study" in err
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-2000:]
    finally:
        reap(first)
    trials = pd.read_parquet(output / "trials.parquet")
    assert sorted(trials["trial"]) == [0, 1, 2, 3]


def _listening(process: psutil.Process) -> list:
    try:
        return [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


STUDY = {
    "task": {"series_length": 1500},
    "model": {"num_layers": 1},
    "train": {"epochs": 1, "compile": False},
    "study": {"name": "bad", "search": {"task.echo_step": [1, 20]}},
}


def _with(section: str, values: dict) -> dict:
    raw = {name: dict(body) for name, body in STUDY.items()}
    raw[section] = {**raw.get(section, {}), **values}
    return raw


BAD_STUDIES = {
    "misspelled key": (_with("study", {"pruner_": "median"}), [], "did you mean study.pruner?"),
    "unknown section": ({**STUDY, "trian": {}}, [], "trian: unknown key; did you mean train?"),
    "wrong type": (_with("study", {"trials": "many"}), [], "study.trials = 'many'"),
    "out of range": (_with("task", {"echo_step": -1}), [], "task.echo_step = -1"),
    "misspelled search key": (
        _with("study", {"search": {"model.num_layer": [1, 2]}}), [],
        "did you mean model.num_layers?",
    ),
    "unknown search key": (
        _with("study", {"search": {"model.depth": [1, 2]}}), [],
        "model.depth: unknown searchable key; allowed: task.series_length",
    ),
    "unsearchable key": (
        _with("study", {"search": {"train.device": ["cpu"]}}), [], "unknown searchable key"
    ),
    "range in a grid": (
        _with("study", {"search": {"train.lr": {"low": 0.1, "high": 1.0}}}), [],
        "the grid sampler needs a list of choices",
    ),
    "searched value out of range": (
        _with("study", {"search": {"task.echo_step": [3, -1]}}), [],
        "study.search.task.echo_step: task.echo_step = -1",
    ),
    "empty choices": (_with("study", {"search": {"task.echo_step": []}}), [], "at least one"),
    "repeated choice": (_with("study", {"search": {"task.echo_step": [3, 3]}}), [], "twice"),
    "empty search": (_with("study", {"search": {}}), [], "study.search is empty"),
    "unknown sampler": (_with("study", {"sampler": "bayes"}), [], "one of grid, tpe, random"),
    "unknown pruner": (_with("study", {"pruner": "asha"}), [], "one of none, median, hyperband"),
    "unknown objective": (_with("study", {"objective": "accuracy"}), [], "study.objective"),
    "tpe without trials": (
        _with("study", {"sampler": "tpe", "search": {"train.lr": {"low": 0.1, "high": 1}}}), [],
        "study.trials: required for the tpe sampler",
    ),
    "more trials than the grid": (_with("study", {"trials": 3}), [], "grid's size (2)"),
    "log range from zero": (
        _with("study", {"sampler": "random", "trials": 2,
                        "search": {"task.echo_step": {"low": 0, "high": 9, "log": True}}}),
        [], "a log range needs low > 0",
    ),
    "range whose values break a rule between its ends": (
        _with("study", {"sampler": "random", "trials": 2,
                        "search": {"task.series_length": {"low": 1000, "high": 50000}}}), [],
        "study.search: task.series_length=1001: task.series_length = 1001: must be a multiple "
        "of task.batch_size (5)",
    ),
    "range too long to enumerate whose values break a rule": (
        _with("study", {"sampler": "random", "trials": 2,
                        "search": {"task.series_length": {"low": 1000, "high": 4_000_000}}}), [],
        "must be a multiple of task.batch_size (5)",
    ),
    "grid point of valid choices that has no window": (
        _with("study", {"search": {"task.series_length": [50000, 100],
                                   "task.truncation": [15, 25]}}), [],
        "study.search: task.series_length=100, task.truncation=25: task.series_length = 100: "
        "too short for one window",
    ),
    "choice repeated as another type": (
        _with("study", {"search": {"task.echo_step": [4, 4.0]}}), [], "lists 4 twice",
    ),
    "choice repeated in another spelling": (
        _with("study", {"search": {"train.lr": ["1e-3", 0.001]}}), [], "lists 0.001 twice",
    ),
    "number too large for a float": (
        _with("train", {"lr": 10**400}), [], "must be a finite number",
    ),
    "integer too large for any column": (
        _with("study", {"seed": 10**400}), [], "must be an integer between 0 and 4294967295",
    ),
    "more epochs than the epoch column holds": (
        _with("train", {"epochs": 32768}), [],
        "train.epochs = 32768: must be an integer between 1 and 32767",
    ),
    "more windows per epoch than a trial's steps column holds": (
        _with("task", {"series_length": 5_000_000, "batch_size": 5, "truncation": 15}), [],
        "task.series_length = 5000000: gives 66666 windows per epoch; at most 65538",
    ),
    "zero cpus per trial": (_with("ray", {"cpus_per_trainer": 0}), [], "ray.cpus_per_trainer = 0"),
    "bad override": (STUDY, ["--set", "study.trials=0"], "study.trials = 0"),
    "override of unknown search key": (
        STUDY, ["--set", "study.search.task.echo=[1]"], "did you mean task.echo_step?"
    ),
    "storage that cannot be opened": (
        _with("study", {"storage": "sqlite:////no/such/folder/study.db"}), [],
        "study.storage = 'sqlite:////no/such/folder/study.db': cannot be opened",
    ),
    "no cluster at the address": (
        STUDY, ["--address", "127.0.0.1:9"], "no Ray cluster answers there",
    ),
    "dashboard URL as the address": (
        STUDY, ["--address", "http://127.0.0.1:8265"], "expected auto, host:port",
    ),
}  # fmt: skip


@pytest.mark.parametrize("raw, args, message", BAD_STUDIES.values(), ids=BAD_STUDIES.keys())
def test_faults_bad_study_input_is_one_line_exit_2_and_nothing_written(
    tmp_path, capsys, monkeypatch, raw, args, message
):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert main(["study", str(path), "--output", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err
    assert not out.exists()


@pytest.mark.parametrize(
    "content, message",
    [(b"\xff\xfe\x00binary", "not a text file"), (b"study: [unclosed", "not valid YAML")],
)
def test_faults_unreadable_study_file_is_one_line_exit_2(tmp_path, capsys, content, message):
    path = tmp_path / "study.yaml"
    path.write_bytes(content)
    assert main(["study", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_faults_study_into_an_output_of_another_config_is_refused(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    out = tmp_path / "out"
    out.mkdir()
    other = {**STUDY, "train": {**STUDY["train"], "lr": 0.1}}
    (out / "config.yaml").write_text(yaml.safe_dump(other))
    assert main(["study", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds results of another config (train.lr: 0.1 there, 0.3 here)" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def _steps_bytes(output: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(output, "steps").iterdir())}


def test_faults_output_whose_storage_was_lost_is_refused(tmp_path, ray_session):
    config = study_config(tmp_path)
    run_study(config.with_params({"study.trials": 2}), progress=False)
    before = _steps_bytes(config.output)
    (tmp_path / "study" / JOURNAL).unlink()  # the storage lost: it knows no trial
    # Its trial numbers would start again at 0, over the trials steps/ holds: refused.
    with pytest.raises(ConfigError, match=r"holds 2 trials .* does not know"):
        run_study(config, progress=False)
    assert _steps_bytes(config.output) == before and not (tmp_path / "study" / JOURNAL).exists()


def test_faults_steps_file_is_never_overwritten(tmp_path):
    config = study_config(tmp_path)
    output = Output(config.output)
    columns = {"num_layers": 1, "state_size": 4, "echo_step": 1, "lr": 0.3}

    def record(loss: float) -> None:
        losses = np.full(200, loss, np.float32)
        record_trials(output, [TrialResult(0, config, columns, losses, "complete")])

    record(0.5)
    before = _steps_bytes(config.output)
    # A second file of the same trials is refused, and the first stays as it was.
    with pytest.raises(FileExistsError):
        record(0.7)
    assert _steps_bytes(config.output) == before


def test_faults_second_output_of_a_database_study_is_refused(tmp_path, ray_session):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    config = study_config(tmp_path, **{"study.storage": storage, "study.trials": 2})
    run_study(config, progress=False)
    second = config.with_params({"output": str(tmp_path / "second")})
    # The study writes to the first output: a second one would mark its running trials FAIL.
    with pytest.raises(ConfigError, match=r"writes to output .*/study, not .*/second"):
        run_study(second, progress=False)
    assert not (tmp_path / "second").exists()
    assert run_study(config.with_params({"study.trials": 4}), progress=False).ran == 2


def test_faults_trainer_that_cannot_train_has_its_trials_run_elsewhere(tmp_path):
    config = study_config(tmp_path, search=TWO_BY_TWO)
    path, output = write_config(tmp_path, config), tmp_path / "study"
    # The first trainer started breaks (its training thread dies), the others train.
    driver = study_process(path, output, trainer_break=str(tmp_path / "broken"))
    _, err = driver.communicate(timeout=300)
    reap(driver)
    assert driver.returncode == 0, err[-2000:]
    trials = pd.read_parquet(output / "trials.parquet")
    # Its trials ran on a trainer that could train: every one completed, none failed.
    assert len(trials) == 4 and (trials["state"] == "COMPLETE").all()
    assert (tmp_path / "broken").exists() and "cannot train" in err


def test_faults_study_where_no_trainer_can_train_stops_with_one_line(tmp_path):
    config = study_config(tmp_path, search=TWO_BY_TWO)
    path, output = write_config(tmp_path, config), tmp_path / "study"
    driver = study_process(path, output, trainer_break="all")
    _, err = driver.communicate(timeout=300)
    reap(driver)
    # Every trainer breaks: the study stops with one line, and records no trial as failed.
    assert driver.returncode == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: no trainer can train here")
    assert not (output / "steps").exists()
    states = Counter(t.state.name for t in _optuna_trials(config))
    assert set(states) == {"FAIL"}  # asked, never run: a rerun runs them


def test_faults_killed_and_rerun_random_study_asks_new_points(tmp_path):
    raw = study_config(tmp_path, **{"task.series_length": 1500, "train.epochs": 1}).to_dict()
    search = {
        "train.lr": {"low": 0.01, "high": 1.0, "log": True},
        "train.seed": {"low": 0, "high": 1000},
    }
    raw["study"].update(sampler="random", trials=8, search=search, lanes_per_trainer=1)
    path, output = write_config(tmp_path, config_from_dict(raw)), tmp_path / "study"
    killed = study_process(path, output, failpoint="told:4")
    try:
        assert killed.wait(timeout=300) == -signal.SIGKILL
    finally:
        reap(killed)
    again = study_process(path, output)
    _, err = again.communicate(timeout=300)
    reap(again)
    assert again.returncode == 0, err[-2000:]
    trials = pd.read_parquet(output / "trials.parquet")
    # The rerun drew new points: none of the killed run's again.
    assert len(trials) == 8 and not trials.duplicated(["lr", "seed"]).any()


def test_faults_a_running_study_is_summarized_and_read_whole_while_it_writes(tmp_path, capsys):
    search = {"task.echo_step": [1, 2, 3], "train.seed": [0, 1]}
    config = study_config(tmp_path, search=search, **{"study.lanes_per_trainer": 1})
    path, output = write_config(tmp_path, config), tmp_path / "study"
    # The study stops itself right after writing its first steps file, before telling Optuna.
    driver = study_process(path, output, failpoint="written:1:stop")
    try:
        _wait_for(lambda: psutil.Process(driver.pid).status() == psutil.STATUS_STOPPED)
        recorded = len(read_steps_outcomes(Output(str(output))))
        # `summarize` works on the running study, counting what it recorded so far.
        assert main(["summarize", str(output)]) == 0
        summary = pd.read_parquet(output / "summary.parquet")
        assert summary["trials"].sum() == recorded >= 1
        driver.send_signal(signal.SIGCONT)
        # Read while it writes: every read of steps/ finds whole files (each trial with all
        # its steps). (trials.parquet, rewritten in place, is read once the study ended: a
        # reader that opens it twice, as pd.read_parquet does, can mix two versions.)
        reads = 0
        while driver.poll() is None or reads == 0:
            steps = pd.read_parquet(output / "steps", columns=["trial", "step"])
            assert (steps.groupby("trial")["step"].agg(["count", "max"]) == [200, 199]).all().all()
            reads += 1
        assert driver.returncode == 0, driver.stderr.read()[-2000:]
    finally:
        reap(driver)
    capsys.readouterr()
    assert len(pd.read_parquet(output / "trials.parquet")) == 6
