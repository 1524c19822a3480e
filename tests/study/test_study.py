import contextlib
import dataclasses
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import psutil
import pytest
import yaml

from pipeline.config import ConfigError, config_from_dict
from pipeline.results.failpoints import FAILPOINT
from pipeline.results.output import Output
from pipeline.results.tables import param_columns
from pipeline.study.compile_ahead import kernel_families
from pipeline.study.driver import run_study
from pipeline.study.optuna_setup import JOURNAL
from pipeline.study.placement import TrialWork, Workload, grid_points, place_run
from pipeline.training.cost import SET_WINDOW_OVERHEAD, lanes_window_cost
from pipeline.training.trial import lanes_key
from tests.conftest import study_config


def _load_optuna(config):
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(Output(config.output).path(JOURNAL)))
    )
    return optuna.load_study(study_name=config.study.name, storage=storage)


def _placed(config, trainers: int) -> list[Workload]:
    """The workloads of `trainers` trainers after placing every grid point of `config`, queued
    at once and placed as the driver places its queue (`place_run`), with room for all."""
    workloads = [Workload() for _ in range(trainers)]
    keys = [p.key for p in config.study.search]
    queue = []
    for point in grid_points(config):
        trial = config.with_params(dict(zip(keys, point, strict=True)))
        queue.append(TrialWork(lanes_key(trial), trial.model, trial.total_steps))
    while queue:
        for index in place_run(workloads, [len(queue)] * trainers, queue):
            workloads[index].add(queue.pop(0))
    return workloads


def test_place_run_keeps_each_architecture_of_a_grid_on_one_trainer_with_trainers_even(tmp_path):
    grid = {
        "model.num_layers": [1, 2, 3, 4],
        "model.state_size": [4, 16],
        "task.echo_step": [3, 9, 15],
        "train.seed": [0, 1],
    }
    first, second = _placed(study_config(tmp_path, search=grid), trainers=2)
    # Both trainers have the same work (placing by count, one had 60 % of it)...
    assert first.load() == pytest.approx(second.load(), rel=0.05)
    # ...and every architecture stays whole on one trainer: a set of lanes pays its window's
    # overhead (cost.SET_WINDOW_OVERHEAD) however few models it steps, and the other
    # architectures even the trainers out, so splitting one would only add work.
    assert not set(first.groups) & set(second.groups)
    assert first.trials + second.trials == 48


def test_lanes_window_cost_counts_a_sets_overhead_once(tmp_path):
    model = study_config(tmp_path).model
    # Two sets of one model each cost a window's overhead more than one set of both.
    assert 2 * lanes_window_cost(model, 1) - lanes_window_cost(model, 2) == SET_WINDOW_OVERHEAD
    # No lanes, no set: nothing.
    assert lanes_window_cost(model, 0) == 0


def test_kernel_families_compiled_ahead_follow_the_grids_lanes_and_windows(tmp_path):
    def families(search: dict, sampler: str = "grid", **params: object) -> tuple[str, ...]:
        config = study_config(tmp_path, search=search, **params)
        study = dataclasses.replace(config.study, sampler=sampler, trials=len(search) * 10)
        return kernel_families(dataclasses.replace(config, study=study))

    first_study = {"model.num_layers": [1, 2, 3, 4], "model.state_size": [4, 16],
                   "task.echo_step": [3, 9, 15], "train.seed": [0, 1]}  # fmt: skip
    long = {"task.series_length": 50_000, "train.epochs": 4}
    # Six trials an architecture: one model at a time, the faster kernels at both states.
    assert families(first_study, **long) == ("by_model",)
    # 64 trials of state 4 and 4 layers (about 1.4 million layer-model-windows): the
    # vectorized kernels, which repay their compile...
    deep = {**long, "train.epochs": 8, "model.num_layers": 4}
    assert families({"train.seed": list(range(64))}, **deep) == ("by_lane",)
    # ...unless the trials are short, or shallow.
    assert families({"train.seed": list(range(64))}, **{**deep, "train.epochs": 2}) == ("by_model",)
    assert families({"train.seed": list(range(64))}, **{**deep, "model.num_layers": 1}) == (
        "by_model",
    )
    # Both where both kinds of architecture train long; both for samplers that plan nothing.
    wide = {"model.state_size": [4, 32], "train.seed": list(range(64))}  # switch at 8 and 128
    assert families(wide, **deep) == ("by_model", "by_lane")
    assert families(first_study, "tpe") == ("by_model", "by_lane")


def test_place_run_splits_a_lone_architecture_only_where_that_ends_it_sooner(tmp_path):
    def lanes(seeds: int, state_size: int) -> list[int]:
        search = {"train.seed": list(range(seeds))}
        config = study_config(tmp_path, search=search, **{"model.state_size": state_size})
        return sorted(w.trials for w in _placed(config, trainers=2))

    # Two idle trainers, one architecture: halves end sooner than the whole once the models'
    # work outweighs the window's overhead that the second set pays (more than
    # PLACE_TOLERANCE sooner)...
    assert lanes(6, 4) == [3, 3]
    assert lanes(7, 16) == [3, 4]
    assert lanes(48, 16) == [24, 24]
    # ...and below that the set stays whole: a third trial at state 4 costs a thirtieth of
    # the overhead a set of its own would add.
    assert lanes(2, 4) == [0, 2]
    assert lanes(3, 4) == [0, 3]


def test_place_run_leaves_a_run_no_trainer_has_room_for_to_those_with_room(tmp_path):
    config = study_config(tmp_path)
    run = [TrialWork(lanes_key(config), config.model, config.total_steps)] * 5
    # Room for 2 and for 1: three of the five are placed, the rest wait in the queue.
    assert sorted(place_run([Workload(), Workload()], [2, 1], run)) == [0, 0, 1]


def test_study_steps_each_architecture_whole_on_one_trainer(finished_study):
    outcome = finished_study.outcome
    # Two trainers, two architectures (state 3 and 4) of four trials each, queued at once:
    # each architecture goes whole to one trainer, so every window a set of lanes stepped
    # trained its four trials (split between the trainers, two each).
    assert outcome.lane_windows == 4 * outcome.windows_stepped


def test_study_writes_steps_and_trials_that_agree_with_optuna(finished_study):
    config, outcome = finished_study.config, finished_study.outcome
    assert outcome.counts == {"COMPLETE": 8}
    steps = pd.read_parquet(config.output + "/steps")
    trials = pd.read_parquet(config.output + "/trials.parquet")
    # One row per trial, one Parquet row per step, with the parameters as columns.
    assert sorted(trials["trial"]) == list(range(8))
    assert steps.groupby("trial").size().to_dict() == dict(
        zip(trials["trial"], trials["steps"], strict=True)
    )
    assert (trials["steps"] == 200).all()
    assert list(steps.columns[5:]) == param_columns(config)
    grid = steps.groupby("trial")[["echo_step", "state_size", "seed"]].first()
    assert sorted(map(tuple, grid.to_numpy())) == [
        (e, s, seed) for e in (1, 20) for s in (3, 4) for seed in (0, 1)
    ]
    # Optuna's storage holds the same trials, states and objective values.
    study = _load_optuna(config)
    assert {t.number: t.state.name for t in study.trials} == dict.fromkeys(range(8), "COMPLETE")
    by_number = trials.set_index("trial")
    for trial in study.trials:
        assert trial.value == pytest.approx(by_number.loc[trial.number, "value"])
        assert trial.params["echo_step"] == by_number.loc[trial.number, "echo_step"]
    # duration_s: each trial's wall time in its lane, within the study's, and within the
    # phase of the driver's loop, which runs between the set-up and the summary.
    assert ((trials["duration_s"] > 0) & (trials["duration_s"] < outcome.phases.trials)).all()
    phases = outcome.phases
    assert min(phases.setup, phases.trials, phases.summary) > 0
    assert phases.setup + phases.trials + phases.summary <= outcome.seconds
    # The echo within reach is learned in two epochs by most trials (one of state size 3 is
    # still on its way); the one beyond the truncation by none.
    final = trials.groupby("echo_step")["final_loss"]
    assert final.median()[1] < 0.2 and final.max()[1] < 0.6 < final.min()[20]


def test_study_same_config_gives_the_same_losses(tmp_path, ray_session):
    first = study_config(tmp_path / "a")
    second = study_config(tmp_path / "b")
    run_study(first, progress=False)
    run_study(second, progress=False)
    a = pd.read_parquet(first.output + "/steps").sort_values(["trial", "step"], ignore_index=True)
    b = pd.read_parquet(second.output + "/steps").sort_values(["trial", "step"], ignore_index=True)
    pd.testing.assert_frame_equal(a, b)


def test_study_resume_runs_only_the_missing_trials(tmp_path, ray_session):
    config = study_config(tmp_path, search={"task.echo_step": [1, 2, 20], "train.seed": [0, 1]})
    partial = run_study(config.with_params({"study.trials": 2}), progress=False)
    assert partial.ran == 2
    first_files = {p.name: p.read_bytes() for p in (tmp_path / "study" / "steps").iterdir()}
    resumed = run_study(config, progress=False)
    assert resumed.ran == 4 and resumed.counts == {"COMPLETE": 6}
    steps = pd.read_parquet(config.output + "/steps")
    assert not steps.duplicated(["trial", "step"]).any()
    assert sorted(steps["trial"].unique()) == list(range(6))
    params = steps.groupby("trial")[["echo_step", "seed"]].first()
    assert not params.duplicated().any()  # every grid point once
    again = {p.name: p.read_bytes() for p in (tmp_path / "study" / "steps").iterdir()}
    assert all(again[name] == data for name, data in first_files.items())
    assert len(_load_optuna(config).trials) == 6
    # A finished study run once more has nothing left to do.
    assert run_study(config, progress=False).ran == 0


def test_study_median_pruner_stops_hopeless_trials_and_keeps_their_steps(tmp_path, ray_session):
    config = study_config(
        tmp_path,
        search={"task.echo_step": [1, 20], "train.seed": [0, 1, 2, 3, 4, 5]},
        **{
            "study.pruner": "median",
            "study.lanes_per_trainer": 1,
            "study.report_every": 50,
            "train.epochs": 3,
        },
    )
    outcome = run_study(config, progress=False)
    trials = pd.read_parquet(config.output + "/trials.parquet")
    steps = pd.read_parquet(config.output + "/steps")
    pruned = trials[trials["state"] == "PRUNED"]
    learned = trials[(trials["state"] == "COMPLETE") & (trials["echo_step"] == 1)]
    # Hopeless trials are pruned, and only trials doing worse than every completed learner,
    # after the first epoch's warm-up...
    assert (pruned["echo_step"] == 20).sum() >= 1
    assert len(learned) >= 3 and pruned["value"].min() > learned["value"].max()
    assert (pruned["steps"] > 100).all() and (pruned["steps"] < 300).all()
    # ...and the steps they ran are kept.
    counts = steps.groupby("trial").size()
    for row in pruned.itertuples():
        assert counts[row.trial] == row.steps
    study = _load_optuna(config)
    assert {t.number for t in study.trials if t.state.name == "PRUNED"} == set(pruned["trial"])
    # A pruned trial's value is the last running loss it reported to the pruner.
    by_number = pruned.set_index("trial")
    for trial in (t for t in study.trials if t.state.name == "PRUNED"):
        last = trial.intermediate_values[max(trial.intermediate_values)]
        assert by_number.loc[trial.number, "value"] == pytest.approx(last)
    # With one lane per trainer, every window a trainer stepped trained exactly one trial's
    # step: a pruned trial's lane went straight on to the next trial instead of idling.
    assert outcome.windows_stepped == outcome.lane_windows == trials["steps"].sum()
    # The summary shows both bounds where trials were pruned: Kaplan–Meier (pruned censored)
    # above, pruned counted as never converging below, and says why.
    summary = pd.read_parquet(config.output + "/summary.parquet")
    hopeless = summary[summary["pruned"] > 0]
    assert len(hopeless) >= 1
    assert (hopeless["converged_fraction_pruned_never"] <= hopeless["converged_fraction"]).all()
    assert (
        "A pruner stops trials because they looked bad"
        in Path(config.output, "summary.md").read_text()
    )


def test_study_refuses_cuda_trainers_on_a_cluster_without_gpus(tmp_path, ray_session):
    # Each trainer would ask Ray for a GPU that never comes.
    config = study_config(tmp_path, **{"train.device": "cuda"})
    with pytest.raises(ConfigError, match="asks 1 GPU of one node, but the largest node has 0"):
        run_study(config, progress=False)


def test_study_whose_trainers_ray_never_places_says_so_and_stops(tmp_path, ray_session, caplog):
    # Both CPUs of the node are held by someone else: trainers fit the node but never start.
    holder = ray_session.remote(num_cpus=2)(_Holder).remote()
    ray_session.get(holder.ready.remote())
    config = study_config(tmp_path, **{"ray.placement_timeout_s": 2})
    try:
        with pytest.raises(ConfigError, match=r"no trainer was placed by Ray in 2 s \(ray.pla"):
            run_study(config, progress=False)
    finally:
        ray_session.kill(holder)
    # Before it stops, the study says what its trainers wait for.
    assert "2 trainer(s) wait for Ray to place them, each asking 1 CPU" in caplog.text


class _Holder:
    def ready(self) -> bool:
        return True


def test_study_idle_trainers_lend_their_cpus_to_those_still_training_at_its_end(
    tmp_path, ray_session
):
    # Three architectures of about one cost on two trainers: placed costliest first, one
    # trainer trains the costliest alone, the other the two others in turn, ending later, by
    # about twice the work. (States 16, 20 and 24 left a quarter's margin by the cost model,
    # and on a fast machine the state-24 trainer sometimes ended last: nothing to lend. At 10
    # epochs a trial took about half a second, less than one trainer may start after the
    # other, and the lone trainer then ended last, 1 run in 4 on a loaded machine.)
    config = study_config(
        tmp_path,
        search={"model.state_size": [20, 21, 22]},
        **{"model.num_layers": 2, "train.compile": True, "train.epochs": 50},
    )
    outcome = run_study(config, progress=False)
    assert outcome.counts == {"COMPLETE": 3}
    # Once the first has nothing left to train, its CPU goes to the other, which then steps
    # its two architectures side by side.
    assert outcome.side_by_side > 0


def test_study_records_trials_that_raise_as_failed_and_goes_on(tmp_path, ray_session):
    # Told to ask Ray for no GPU, every trial of a CUDA study raises in its trainer here.
    config = study_config(tmp_path, **{"train.device": "cuda", "ray.gpus_per_trainer": 0})
    outcome = run_study(config, progress=False)
    assert outcome.counts == {"FAIL": 4}
    trials = pd.read_parquet(config.output + "/trials.parquet")
    assert trials["error"].str.contains("torch sees 0 CUDA devices").all()
    assert all(t.state.name == "FAIL" for t in _load_optuna(config).trials)


def test_study_refuses_a_relative_output_inside_a_ray_job(tmp_path, ray_session, monkeypatch):
    # The variable Ray's job supervisor sets for a submitted job's driver.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.chdir(tmp_path)
    config = study_config(tmp_path).with_params({"output": "results/relative"})
    with pytest.raises(ConfigError, match="relative, but this runs as a Ray job"):
        run_study(config, progress=False)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("storage", ["study.journal", "sqlite:///study.db"])
def test_study_refuses_a_relative_storage_path_inside_a_ray_job(tmp_path, monkeypatch, storage):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.chdir(tmp_path)
    config = study_config(tmp_path, **{"study.storage": storage})
    # A relative storage would land in the job's temporary copy: refused before it is opened.
    with pytest.raises(ConfigError, match=r"study.storage = .* is relative, but this runs as a"):
        run_study(config, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_study_refuses_an_output_holding_another_config(tmp_path, ray_session):
    config = study_config(tmp_path, **{"study.trials": 1})
    run_study(config, progress=False)
    before = sorted(p.name for p in (tmp_path / "study").rglob("*"))
    with pytest.raises(ConfigError, match="holds results of another config"):
        run_study(config.with_params({"train.lr": 0.1}), progress=False)
    assert sorted(p.name for p in (tmp_path / "study").rglob("*")) == before


def test_study_writes_to_a_pyarrow_filesystem_uri(tmp_path, ray_session):
    # A URI that pyarrow.fs understands works as the output; file:// is the one testable here.
    config = study_config(tmp_path, **{"study.trials": 2}).with_params(
        {"output": f"file://{tmp_path}/uri-study"}
    )
    outcome = run_study(config, progress=False)
    assert outcome.counts == {"COMPLETE": 2}
    assert len(pd.read_parquet(tmp_path / "uri-study" / "steps")) == 2 * 200
    assert (tmp_path / "uri-study" / "study.journal").exists()
    assert (tmp_path / "uri-study" / "summary.md").exists()


def test_study_refuses_a_remote_output_it_cannot_lock(tmp_path, ray_session):
    # pyarrow's in-memory filesystem stands for s3:// or gs://: no lock can be taken there.
    storage = f"sqlite:///{tmp_path}/study.db"
    config = study_config(tmp_path, **{"study.storage": storage}).with_params(
        {"output": "mock:///echo"}
    )
    with pytest.raises(ConfigError, match="cannot be locked"):
        run_study(config, progress=False)
    assert not (tmp_path / "study.db").exists() or optuna.get_all_study_names(storage) == []


def test_an_embedded_ray_starts_only_what_a_study_uses_and_stops_leaving_none_of_it():
    # start_embedded_ray polls for the node's registration, and starts no autoscaler monitor,
    # nor an API server unless the dashboard is asked for (Ray's own methods put back after);
    # stop_embedded_ray must leave no process of that Ray (those it started, and theirs: agents,
    # workers), and report no error.
    script = """
import json, ray
from pipeline.study.ray_connection import (
    start_embedded_ray, stop_embedded_ray, wait_until_registered,
)
for dashboard in (False, True):
    start_embedded_ray(num_cpus=1, dashboard=dashboard)
    assert ray.get(ray.put(41)) + 1 == 42
    assert ray._private.services.get_node.__module__ == "ray._private.services"  # restored
    assert ray._private.node.Node.start_monitor.__qualname__ == "Node.start_monitor"
    assert ray._private.node.Node.start_api_server.__qualname__ == "Node.start_api_server"
    node = ray._private.worker._global_node
    assert wait_until_registered(node.gcs_address, node.node_id, timeout=5)
    assert not wait_until_registered(node.gcs_address, "ab" * 28, timeout=0.1)  # no such node
    kinds = sorted(node.all_processes)
    print(json.dumps({"kinds": kinds, "session": node.session_name}), flush=True)
    stop_embedded_ray()
"""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    plain, with_dashboard = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert {"raylet", "gcs_server"} <= set(plain["kinds"])
    assert not {"monitor", "dashboard"} & set(plain["kinds"])
    assert "dashboard" in with_dashboard["kinds"]
    assert "monitor" not in with_dashboard["kinds"]
    assert _processes_naming(plain["session"]) == []
    # The dashboard's module processes notice on their own, a moment later, that it has gone:
    # the test waits for them to exit, the deadline only bounds a failure (on a loaded machine
    # they took more than 10 s).
    deadline = time.monotonic() + 120
    while _processes_naming(with_dashboard["session"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_naming(with_dashboard["session"]) == []
    assert "autoscaler failed" not in done.stderr


# What an embedded Ray's processes were started with, with and without the dashboard: the
# GCS's system config, and the environment of the raylet (which starts the dashboard agent with
# it: the agent's own /proc environ is overwritten when it retitles itself) and of the log
# monitor; then a task's print, as the driver sees it.
EMBEDDED_RAY_SETTINGS = """
import io, json, os, sys, time, psutil, ray
from pipeline.study.ray_connection import start_embedded_ray, stop_embedded_ray

def started(kind):
    return psutil.Process(node.all_processes[kind][0].process.pid)

@ray.remote
def shout(text):
    print(text, flush=True)

dashboard = sys.argv[1] == "dashboard"
start_embedded_ray(num_cpus=1, dashboard=dashboard)
node = ray._private.worker._global_node
settings = {
    "metrics": ray._private.state.state.get_system_config().get("enable_metrics_collection"),
    "raylet": started("raylet").environ(),
    "log_monitor": started("log_monitor").environ(),
    "driver_reporter": os.environ.get("REPORTER_UPDATE_INTERVAL_MS"),
}
original, seen = sys.stdout, io.StringIO()
sys.stdout = seen
ray.get(shout.remote("a-line-from-a-worker"))
deadline = time.monotonic() + 60  # bounds a failure only: the line comes within a second
while "a-line-from-a-worker" not in seen.getvalue() and time.monotonic() < deadline:
    time.sleep(0.05)
sys.stdout = original
settings["forwarded"] = "a-line-from-a-worker" in seen.getvalue()
print(json.dumps(settings), flush=True)
stop_embedded_ray()
"""


def _embedded_ray_settings(dashboard: bool) -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env = {k: v for k, v in env.items() if k not in ("REPORTER_UPDATE_INTERVAL_MS", "RAY_ADDRESS")}
    argv = [sys.executable, "-c", EMBEDDED_RAY_SETTINGS, "dashboard" if dashboard else "plain"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_embedded_ray_without_the_dashboard_skips_what_only_the_dashboard_reads():
    plain = _embedded_ray_settings(dashboard=False)
    # Without the dashboard, Ray records no metrics, its agent gathers node stats once a
    # minute and its log monitor looks for new files every 0.5 s; the driver's own environment
    # is put back after the start.
    assert (plain["metrics"], plain["driver_reporter"]) == (False, None)
    assert plain["raylet"]["REPORTER_UPDATE_INTERVAL_MS"] == "60000"
    assert plain["log_monitor"]["RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"] == "0"


def test_embedded_ray_with_the_dashboard_keeps_what_the_dashboard_reads():
    with_dashboard = _embedded_ray_settings(dashboard=True)
    # With the dashboard, Ray's own defaults: metrics recorded, stats every 5 s.
    assert with_dashboard["metrics"] is not False
    assert "REPORTER_UPDATE_INTERVAL_MS" not in with_dashboard["raylet"]


def test_embedded_ray_without_the_dashboard_still_forwards_a_workers_output():
    plain = _embedded_ray_settings(dashboard=False)
    # A trainer's warnings reach the user: the log monitor still forwards a worker's output.
    assert plain["forwarded"]


def _processes_naming(text: str) -> list[str]:
    """Live processes (not zombies) whose command line or open files name `text` (Ray's
    agents retitle themselves, but keep their session's log files open)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            files = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except (OSError, IndexError):
            continue
        if state != "Z" and (text in command or any(text in f for f in files)):
            found.append(command[:200])
    return found


# A study run from Python, as the benchmarks run it: Ray imported before anything is decided.
RUN_STUDY_FROM_PYTHON = """
import sys
from pipeline.config import load_config
from pipeline.study import run_study
run_study(load_config(sys.argv[1], ["output=" + sys.argv[2]]), progress=False)
"""
ENTRY_POINTS = {
    "command line": lambda config, out: ["-m", "pipeline", "study", config, "--output", out],
    "run_study": lambda config, out: ["-c", RUN_STUDY_FROM_PYTHON, config, out],
}


@pytest.mark.parametrize("entry", ENTRY_POINTS.values(), ids=ENTRY_POINTS.keys())
def test_embedded_ray_listens_on_loopback_only_from_every_entry_point(tmp_path, entry):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_config(tmp_path, **{"study.trials": 2}).to_dict()))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", FAILPOINT: "written:1:stop"}
    for name in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)
    # The driver stops itself once a trial is recorded: its Ray and trainers are all up.
    command = [sys.executable, *entry(str(path), str(tmp_path / "out"))]
    driver = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    try:
        stopped = _wait_for(lambda: psutil.Process(driver.pid).status() == psutil.STATUS_STOPPED)
        assert stopped, driver.stderr.read()[-2000:] if driver.poll() is not None else "no stop"
        listening = _listening(psutil.Process(driver.pid))
        os.kill(driver.pid, signal.SIGCONT)
        assert driver.wait(timeout=120) == 0, driver.stderr.read()[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    titles = {title for title, _ in listening}
    assert {"gcs_server", "raylet", "ray::Trainer"} <= titles, listening
    # Every server of the driver, Ray's processes and the trainers is on the loopback interface.
    assert [(t, a) for t, a in listening if not _loopback(a)] == []


def _wait_for(condition, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _listening(driver: psutil.Process) -> set[tuple[str, str]]:
    """(title, address) of every listening TCP socket of the driver and its descendants."""
    found = set()
    for process in [driver, *driver.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            title = process.cmdline()[0].split()[0]
            for socket in process.net_connections(kind="tcp"):
                if socket.status == psutil.CONN_LISTEN:
                    found.add((os.path.basename(title), socket.laddr.ip))
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket's
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _random_study(tmp_path, search: dict, trials: int):
    """A random study of tiny trials (20 windows) over `search`."""
    raw = study_config(tmp_path, **{"task.series_length": 1500, "train.epochs": 1}).to_dict()
    raw["study"].update(sampler="random", trials=trials, search=search)
    return config_from_dict(raw)


RANDOM_SEARCH = {
    "train.lr": {"low": 0.01, "high": 1.0, "log": True},
    "train.seed": {"low": 0, "high": 1000},
}


def test_study_extended_random_study_asks_new_points(tmp_path, ray_session):
    config = _random_study(tmp_path, RANDOM_SEARCH, trials=12)
    run_study(config, progress=False)
    run_study(config.with_params({"study.trials": 24}), progress=False)
    trials = pd.read_parquet(config.output + "/trials.parquet").sort_values("trial")
    first, second = trials[trials["trial"] < 12], trials[trials["trial"] >= 12]
    # The extension drew new points, not the first run's again: no two trials share them.
    assert len(first) == len(second) == 12
    assert not trials.duplicated(["lr", "seed"]).any()


def test_study_random_sampler_never_runs_a_point_twice(tmp_path, ray_session):
    config = _random_study(tmp_path, {"task.echo_step": [1, 2, 3]}, trials=3)
    run_study(config, progress=False)
    more = run_study(config.with_params({"study.trials": 5}), progress=False)
    trials = pd.read_parquet(config.output + "/trials.parquet")
    # Each of the 3 points once; asked for 5, the study stops when the space is spent.
    assert sorted(trials["echo_step"]) == [1, 2, 3] and more.ran == 0
