"""The study submitted as a Ray job to a real two-node Ray cluster on this machine, as users run
it: a head and a worker node, each its own `ray start` with its own temp dir and ports and one
CPU. Trials must run on both nodes, and losing the worker node mid-study must lose no trial; a
worker node needs no disk the driver writes; a driver joins the cluster it is pointed at; a head
with token authentication runs only the jobs that bring its token."""

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest

from pipeline.config import load_config
from tests.ray_nodes import (
    RAY,
    RayCluster,
    RayNode,
    missing_hiding,
    token_env,
    without_token,
)

REPO = Path(__file__).parents[2]
QUICK = load_config(REPO / "configs" / "quick.yaml")
GRID = QUICK.study.grid_size
WINDOWS_PER_EPOCH = 666  # 50,000 values in 5 rows, windows of 15
GRID_POINT = ["num_layers", "state_size", "echo_step", "seed"]
# The quick grid in trials of 20 windows: seconds of training in all.
TINY = ["--set", "train.epochs=1", "--set", "task.series_length=1500"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head of our own with one CPU, its dashboard on 127.0.0.1, and Ray's token
    authentication on, as README asks of any head: every command the tests send it brings the
    token (`cluster.env`). Tests join worker nodes."""
    head = RayCluster.start(num_cpus=1, env=token_env(tmp_path_factory.mktemp("home")))
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture
def worker_node(cluster):
    """A worker node with one CPU, joined to the head for one test (which may kill it)."""
    node = cluster.add_worker_node(num_cpus=1)
    try:
        yield node
    finally:
        node.stop()


def _submit_quick(cluster: RayCluster, log: Path, *args: str):
    submission_id = f"test-{uuid.uuid4().hex[:8]}"
    entrypoint = ["python", "-m", "pipeline", "study", "configs/quick.yaml", *args]
    with log.open("w") as out:
        job = cluster.submit(submission_id, REPO, *entrypoint, stdout=out, stderr=out)
    return submission_id, job


def _reap(job) -> None:
    """End a `ray job submit` client that outlived its test (the job itself dies with the head)."""
    if job.poll() is None:
        job.kill()
        job.wait()


def _finish(job, log: Path, timeout: float = 240) -> str:
    """Wait for the submitted job; return what it printed, or fail with its tail."""
    try:
        job.wait(timeout=timeout)
    finally:
        _reap(job)
    text = log.read_text()
    assert job.returncode == 0, text[-3000:]
    return text


def _finished_trials(output: Path) -> set[int]:
    if not any((output / "steps").glob("*.parquet")):
        return set()
    return set(pd.read_parquet(output / "steps", columns=["trial"])["trial"])


def _assert_every_grid_point_complete_once(output: Path, steps_per_trial: int) -> None:
    trials = pd.read_parquet(output / "trials.parquet")
    steps = pd.read_parquet(output / "steps")
    assert len(trials) == GRID and (trials["state"] == "COMPLETE").all(), trials
    assert not trials.duplicated(GRID_POINT).any() and trials["trial"].is_unique
    # Each trial's steps are whole: every global step once, none twice from a rerun.
    assert set(steps["trial"]) == set(trials["trial"])
    for trial, ran in steps.groupby("trial")["step"]:
        assert sorted(ran) == list(range(steps_per_trial)), f"trial {trial}"
    # The storage agrees: each grid point COMPLETE exactly once (a lost trial may have been
    # marked FAIL there before it ran again).
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(output / "study.journal"))
    )
    stored = optuna.load_study(study_name=QUICK.study.name, storage=storage).trials
    complete = [tuple(t.params[key] for key in GRID_POINT)
                for t in stored if t.state.name == "COMPLETE"]  # fmt: skip
    assert len(complete) == len(set(complete)) == GRID


def _wait_for_trainer(
    cluster: RayCluster, node: RayNode, submission_id: str, job, log: Path, timeout: float = 120
) -> None:
    """Wait until the job has a live trainer on `node`: a worker process there that is still
    constructing one (importing torch, on a loaded machine for seconds) is not yet enough."""
    deadline = time.monotonic() + timeout
    while not _alive_actor_on(cluster, node, submission_id):
        assert job.poll() is None, (
            "the job ended before the worker node ran trials:\n" + (log.read_text()[-3000:])
        )
        assert time.monotonic() < deadline, "no trainer ran on the worker node within 120 s"
        time.sleep(0.5)


def _alive_actor_on(cluster: RayCluster, node: RayNode, submission_id: str) -> bool:
    if not node.busy_workers():  # cheap: only then ask the cluster's state API
        return False
    job_id = cluster.job(submission_id).get("job_id")
    return any(
        actor["job_id"] == job_id and actor["state"] == "ALIVE" and actor["node_id"] == node.node_id
        for actor in cluster.list_state("actors")
    )


def test_cluster_job_runs_on_both_nodes_and_loses_no_trial_with_the_worker_node(
    cluster, worker_node, tmp_path
):
    output = tmp_path / "quick"
    log = tmp_path / "job.log"
    # Twelve epochs: 7,992 windows a trial, so the study outlives the kill by many seconds.
    epochs = 12
    submission_id, job = _submit_quick(
        cluster, log, "--output", str(output), "--set", f"train.epochs={epochs}"
    )
    try:
        # A live trainer on the worker node holds trials: the driver places them on every
        # trainer it starts, before the trainer answers.
        _wait_for_trainer(cluster, worker_node, submission_id, job, log)
        worker_node.kill()
        finished_at_kill = _finished_trials(output)
        printed = _finish(job, log)
    finally:
        _reap(job)
    # The kill landed mid-study: the lost trainer's trials ran again.
    assert len(finished_at_kill) < GRID, printed[-3000:]
    lost = re.findall(r"a trainer was lost \(.*\); its (\d+) trials run again", printed)
    assert lost and int(lost[0]) >= 1, printed[-3000:]
    assert f"Study echo-quick: {GRID} trials ran" in printed
    record = cluster.job(submission_id)
    assert record["status"] == "SUCCEEDED"
    # Trials ran on the head and on the worker node: each held a CPU for this job.
    assert cluster.nodes_with_cpu_work(record["job_id"]) == {
        cluster.head.node_id, worker_node.node_id,
    }  # fmt: skip
    cluster.wait_for_node_state(worker_node.node_id, "DEAD")
    # The study went on without it: every trial is recorded once, and the summary written.
    _assert_every_grid_point_complete_once(output, epochs * WINDOWS_PER_EPOCH)
    assert (output / "summary.md").exists()
    # Within reach of the gradient the echo is learned, beyond it it is not.
    final = pd.read_parquet(output / "trials.parquet").groupby("echo_step")["final_loss"].median()
    assert final[1] < 0.6 < final[20]


def test_cluster_job_submit_refuses_a_relative_output(cluster, tmp_path):
    log = tmp_path / "job.log"
    _, job = _submit_quick(cluster, log, "--output", "results/lost")
    try:
        job.wait(timeout=240)
    finally:
        _reap(job)
    assert job.returncode != 0
    assert "is relative, but this runs as a Ray job" in log.read_text()


def test_cluster_study_waits_for_a_node_that_fits_a_trainer_then_stops(cluster, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline", "study", "configs/quick.yaml", "--address",
               cluster.gcs_address, "--set", "ray.cpus_per_trainer=2",
               "--set", "ray.placement_timeout_s=2", "--output", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=cluster.env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    lack = "ray.cpus_per_trainer = 2: a trainer asks 2 CPU of one node, but the largest node has 1"
    # A node may still join a cluster: the study says what it waits for, then stops in one line.
    assert f"{lack} CPU; waiting up to 2 s (ray.placement_timeout_s)" in done.stderr
    last = done.stderr.splitlines()[-1]
    assert (done.returncode, last) == (
        2,
        f"error: {lack} CPU; none joined in 2 s (ray.placement_timeout_s)",
    )
    assert not out.exists()


def _start_driver(env: dict[str, str], *args: str) -> subprocess.Popen:
    """`python -m pipeline study configs/quick.yaml <args>` on this machine, as a driver that
    joins a cluster from one of its nodes runs; its stderr kept."""
    command = [sys.executable, "-m", "pipeline", "study", "configs/quick.yaml", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_cluster_study_joins_the_running_cluster_it_is_pointed_at(cluster, tmp_path):
    ways = {
        # Ray's own lookup of the cluster last started on this machine, kept to the test's head.
        "--address auto": (cluster.auto_env(), ["--address", "auto"]),
        "ray.address": (cluster.env, ["--set", f"ray.address={cluster.gcs_address}"]),
        "RAY_ADDRESS": ({**cluster.env, "RAY_ADDRESS": cluster.gcs_address}, []),
    }
    # Each driver asks for trainers of 2 CPUs, which only a Ray embedded on this machine (2
    # cores or more) could place: joined to the head (1 CPU) it stops after 1 s, having run
    # as one of the head's jobs. The three run at once.
    asks = ["--set", "ray.cpus_per_trainer=2", "--set", "ray.placement_timeout_s=1"]
    drivers = {
        way: _start_driver(env, *asks, *where, "--output", str(tmp_path / str(number)))
        for number, (way, (env, where)) in enumerate(ways.items())
    }
    errors = {way: driver.communicate(timeout=300)[1] for way, driver in drivers.items()}
    jobs = {job["driver_info"]["pid"] for job in cluster.list_state("jobs")
            if job.get("driver_info")}  # fmt: skip
    for way, driver in drivers.items():
        # The driver was a job of the test's head (a Ray embedded in it would be no job
        # there), and saw the head's one CPU as the largest node.
        assert str(driver.pid) in jobs, f"{way}: {errors[way][-3000:]}"
        assert driver.returncode == 2, f"{way}: {errors[way][-3000:]}"
        assert "but the largest node has 1 CPU; none joined in 1 s" in errors[way], way


def _as_the_node_sees_it(node: RayNode, path: Path) -> Path:
    """`path` in the mount namespace of the node's processes."""
    return Path(f"/proc/{node.process.pid}/root{path}")


def test_cluster_worker_node_without_the_drivers_disk_runs_trials(cluster, tmp_path):
    reason = missing_hiding()
    if reason:
        pytest.skip(reason)
    output = tmp_path / "results" / "quick"
    output.parent.mkdir()
    (output.parent / "the-drivers-disk").touch()
    # Both nodes are on this machine's disk: to the worker node, the folder that the output
    # goes in is an empty, read-only one, as on a machine without the driver's disk.
    node = cluster.add_worker_node(num_cpus=1, hide=output.parent)
    try:
        seen = _as_the_node_sees_it(node, output.parent)
        assert os.listdir(seen) == [] and not os.access(seen, os.W_OK)
        # The driver joins the cluster from the head's machine (as a job's driver would).
        driver = _start_driver(cluster.env, "--address", cluster.gcs_address,
                               "--output", str(output), *TINY)  # fmt: skip
        _, errors = driver.communicate(timeout=300)
        assert driver.returncode == 0, errors[-3000:]
        job = next(job for job in cluster.list_state("jobs")
                   if (job.get("driver_info") or {}).get("pid") == str(driver.pid))  # fmt: skip
        ran_on = cluster.nodes_with_cpu_work(job["job_id"])
    finally:
        node.stop()
    # Only the driver writes results: the worker node's trainer ran trials (the driver places
    # trials on every trainer it starts), none of them lost or failed.
    assert ran_on == {cluster.head.node_id, node.node_id}
    assert "a trainer was lost" not in errors, errors[-3000:]
    trials = pd.read_parquet(output / "trials.parquet")
    assert len(trials) == GRID and (trials["status"] == "complete").all(), trials


def test_cluster_with_token_auth_runs_a_job_given_the_token_and_refuses_one_without(
    cluster, tmp_path
):
    without = without_token(cluster.env)
    job = [RAY, "job", "submit", "--address", cluster.dashboard, "--", "python", "-c", "pass"]
    runs = {env_name: subprocess.run(job, env=env, capture_output=True, text=True, timeout=120,
                                     check=False)
            for env_name, env in (("with", cluster.env), ("without", without))}  # fmt: skip
    refused = tmp_path / "refused"
    driver = subprocess.run(
        [sys.executable, "-m", "pipeline", "study", "configs/quick.yaml",
         "--address", cluster.gcs_address, "--output", str(refused), *TINY],
        cwd=REPO, env=without, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    # The head runs the job that brings its token (as every other test here does)...
    assert runs["with"].returncode == 0, runs["with"].stderr[-3000:]
    # ...and its job API refuses the same job without it, saying why.
    assert runs["without"].returncode != 0
    assert "Unauthorized: Missing authentication token" in runs["without"].stderr
    # A driver that joins without it stops in one line naming the token (not after Ray's 15 s
    # of retries, as a cluster that does not answer), exit 2, nothing written.
    assert driver.returncode == 2, driver.stderr[-3000:]
    assert driver.stderr.splitlines()[-1] == (
        f"error: ray.address = '{cluster.gcs_address}': the cluster refused this client "
        "(InvalidAuthToken: Authentication token is missing or incorrect); it uses token "
        "authentication: set RAY_AUTH_MODE=token and give this client the cluster's token "
        "(RAY_AUTH_TOKEN, or ~/.ray/auth_token)"
    )
    assert not refused.exists()
