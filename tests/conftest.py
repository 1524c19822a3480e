"""Shared helpers: small configs that train in seconds on two cores."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import Config, config_from_dict

# 1,500 values in 5 rows of 300 columns: 20 windows of 15 per epoch.
SMALL = {
    "task": {"series_length": 1500, "echo_step": 3, "batch_size": 5, "truncation": 15},
    "model": {"num_layers": 2, "state_size": 4},
    "train": {"epochs": 2, "lr": 0.3, "seed": 0, "compile": False, "device": "cpu"},
}


def python_output(script: str) -> str:
    """What `script` prints, run by this Python in a fresh process from the repository root
    (a clean slate of imported modules); the test fails with its stderr if it fails."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def copy_of_the_kernel_cache(folder: Path) -> Path:
    """A kernel cache of the test's own at `folder`, holding what this machine's cache holds
    of this version of the kernels (so nothing compiles again), whose locks no other process
    on the machine takes: give it to a subprocess as NUMBA_CACHE_DIR."""
    from pipeline.training.kernel_cache import kernels_folder

    folder.mkdir(parents=True)
    if kernels_folder().is_dir():
        shutil.copytree(kernels_folder(), folder / kernels_folder().name)
    return folder


def small_config(**params: object) -> Config:
    """A config of a few dozen windows; `params` are dotted keys, e.g. {"train.seed": 1}."""
    return config_from_dict(SMALL).with_params({k.replace("__", "."): v for k, v in params.items()})


def train_alone(config: Config) -> np.ndarray:
    """A trial's losses in lanes of its own, by the step its trainer takes (on the CPU, the
    numba kernels on numpy arrays), in this process."""
    from pipeline.training.device import window_step
    from pipeline.training.lanes import Lanes
    from pipeline.training.trial import LaneTrial

    step, device = window_step(config, threads=1, gpu_from_ray=False)
    lanes = Lanes(config, step, device)
    lanes.admit(LaneTrial(0, config))
    finished = []
    while len(lanes):
        finished += lanes.step()[0]
    return finished[0].losses


@pytest.fixture
def small() -> Config:
    return small_config()


@pytest.fixture
def one_thread():
    """torch on one thread for the test: its threads split an elementwise pass where they
    please, and so change which values its scalar tail rounds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    """A real embedded Ray with two CPUs, shared by the tests that run studies in-process,
    started (on 127.0.0.1) and stopped as a study's own."""
    import ray

    from pipeline.study.ray_connection import start_embedded_ray, stop_embedded_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    start_embedded_ray(num_cpus=2, dashboard=False)
    yield ray
    stop_embedded_ray()


def study_config(tmp_path, search: dict | None = None, **params: object) -> Config:
    """A small grid study: 1 layer, 100 windows per epoch, 2 epochs, by default over echo step
    and state size; `params` are dotted keys as for small_config. Its trainers train on the
    numba kernels, as a user's CPU study does: their bits do not depend on the process or on
    the lanes beside a trial, so a study's losses equal those of each trial trained alone."""
    raw = {
        "task": {"series_length": 7500, "batch_size": 5, "truncation": 15},
        "model": {"num_layers": 1, "state_size": 4},
        "train": {"epochs": 2, "compile": True, "device": "cpu"},
        "study": {
            "name": "test-study",
            "search": search or {"task.echo_step": [1, 20], "model.state_size": [3, 4]},
        },
        "output": str(tmp_path / "study"),
    }
    return config_from_dict(raw).with_params(params)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server of the session's own on 127.0.0.1 (tests/servers.py), stopped at the
    session's end; the tests that need it are skipped only where PostgreSQL is not installed."""
    from tests.servers import PostgresServer, missing_postgres

    reason = missing_postgres()
    if reason:
        pytest.skip(reason)
    server = PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server of the session's own on 127.0.0.1, stopped at the session's end."""
    from tests.servers import S3Server, missing_moto

    reason = missing_moto()
    if reason:
        pytest.skip(reason)
    server = S3Server.start()
    yield server
    server.stop()


@pytest.fixture
def database(postgres_server, request) -> str:
    """The URL of a fresh, empty database on the session's server, named after the test."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:50].lower()
    return postgres_server.create_database(f"{name}_{os.urandom(3).hex()}")


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """This process's environment pointed at the session's S3 server (endpoint and keys);
    returned, for child processes."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server.env()


@pytest.fixture
def bucket(s3_server, s3_env) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    name = f"echo-{os.urandom(4).hex()}"
    s3_server.create_bucket(name)
    return name


@dataclass(frozen=True)
class FinishedStudy:
    """A study run to its end, shared read-only by the tests of several files."""

    config: Config
    outcome: Any
    """Its run_study's StudyOutcome."""

    @property
    def output(self) -> str:
        return self.config.output


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory, ray_session) -> FinishedStudy:
    """A finished study, run once per test session: echo 1 (within the truncation of 15) and
    20 (beyond) × state size 3 and 4 × seeds 0 and 1, 2 epochs of 100 windows, converged below
    a 100-step mean of 0.25. Tests only read it (copy it to change it)."""
    from pipeline.study.driver import run_study

    config = study_config(
        tmp_path_factory.mktemp("finished"),
        search={"task.echo_step": [1, 20], "model.state_size": [3, 4], "train.seed": [0, 1]},
        **{"convergence.threshold": 0.25},
    )
    return FinishedStudy(config, run_study(config, progress=False))
