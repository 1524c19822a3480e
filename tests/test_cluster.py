"""The study submitted as a Ray job to a real Ray head on 127.0.0.1, as users run it."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import load_config

REPO = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of our own: its own temp dir, ports and CPUs, bound to 127.0.0.1, stopped by
    terminating the `ray start --block` process that owns it (never a machine-wide `ray stop`)."""
    temp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's socket paths have a limit
    dashboard = _free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # a single-node Ray: loopback only
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is this venv's
    }
    env.pop("RAY_ADDRESS", None)
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--temp-dir={temp}", "--num-cpus=2", f"--port={_free_port()}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
        f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
    ]  # fmt: skip
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 - open for the head's lifetime
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_jobs_api(address, env, head)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # its own process group only
            head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_jobs_api(address: str, env: dict, head: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert head.poll() is None, "the Ray head exited while starting"
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                               capture_output=True, check=False)  # fmt: skip
        if probe.returncode == 0:
            return
        time.sleep(1)
    raise TimeoutError("the Ray head's job API did not answer within 90 s")


def _submit(address: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
         "--", "python", "-m", "pipeline", "study", "configs/quick.yaml", *args],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def test_cluster_job_submit_writes_the_study_to_an_absolute_output(ray_head, tmp_path):
    address, env = ray_head
    output = tmp_path / "quick"
    done = _submit(address, env, "--output", str(output), "--set", "train.epochs=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    grid = load_config(REPO / "configs" / "quick.yaml").study.grid_size
    assert f"Study echo-quick: {grid} trials ran" in done.stdout
    steps = pd.read_parquet(output / "steps")
    trials = pd.read_parquet(output / "trials.parquet")
    assert len(trials) == grid and (trials["state"] == "COMPLETE").all()
    assert steps.groupby("trial").size().eq(666).all() and len(steps) == grid * 666
    assert (output / "summary.md").exists()
    # Within reach of the gradient the echo starts to be learned, beyond it it is not.
    final = trials.groupby("echo_step")["final_loss"].median()
    assert final[1] < 0.6 < final[20]


def test_cluster_job_submit_refuses_a_relative_output(ray_head):
    address, env = ray_head
    done = _submit(address, env, "--output", "results/lost")
    assert done.returncode != 0
    assert "is relative, but this runs as a Ray job" in done.stdout + done.stderr
