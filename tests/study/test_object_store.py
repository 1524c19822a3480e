"""Outputs on S3, against moto's S3 server started for the session (tests/servers.py), with the
study's storage in PostgreSQL: a driver killed in the middle of writing steps, its rerun, its
losses against each point trained alone, `summarize` and pandas on the bucket, and each S3
failure as one line before anything is written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
import yaml

from pipeline.__main__ import main
from pipeline.results.failpoints import FAILPOINT
from pipeline.study.database import TABLE, connect
from tests.conftest import study_config
from tests.servers import S3Server, refusing_port
from tests.study.study_processes import TINY, losses_by_point

ROOT = Path(__file__).resolve().parents[2]
SEARCH = {"train.seed": [0, 1], "train.lr": [0.1, 0.3]}  # within SEED_BY_LR


def _cli(*args: str, env: dict[str, str], failpoint: str | None = None) -> subprocess.Popen:
    """`python -m pipeline ARGS` in a session of its own, with `env` over this environment."""
    child = {**os.environ, "RAY_AUTH_MODE": "disabled", **env}
    child.pop("RAY_ADDRESS", None)
    child.pop(FAILPOINT, None)
    if failpoint:
        child[FAILPOINT] = failpoint
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=child, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, err


def _uri(server: S3Server, bucket: str, prefix: str) -> str:
    """An S3 URI that names its endpoint itself, in pyarrow's query parameters."""
    return f"s3://{bucket}/{prefix}?endpoint_override=127.0.0.1:{server.port}&scheme=http"


def _objects(server: S3Server, path: str) -> list[str]:
    """The objects under `path` that readers see (not the empty markers of folders)."""
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    infos = server.filesystem().get_file_info(selector)
    return sorted(info.path for info in infos if info.type == pafs.FileType.File)


@dataclass
class S3Study:
    """A study into S3 killed while writing its first steps, then rerun to its end."""

    server: S3Server
    bucket: str
    uri: str
    after_kill: list[str]
    killed_code: int
    rerun: tuple[int, str]


@pytest.fixture(scope="module")
def s3_study(s3_server, postgres_server, tmp_path_factory) -> S3Study:
    tmp = tmp_path_factory.mktemp("s3-study")
    bucket = f"echo-{os.urandom(4).hex()}"
    s3_server.create_bucket(bucket)
    database = postgres_server.create_database(f"s3_study_{os.urandom(3).hex()}")
    uri = _uri(s3_server, bucket, "study")
    config = study_config(tmp, search=SEARCH, **TINY, **{"study.storage": database,
                                                         "study.only_writer": True})  # fmt: skip
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    # The endpoint is in the URI: the study's environment has the keys only.
    env = {k: v for k, v in s3_server.env().items() if k != "AWS_ENDPOINT_URL"}
    killed = _cli("study", str(path), "--output", uri, env=env, failpoint="writing steps:1")
    killed_code, _ = _finish(killed)
    after_kill = _objects(s3_server, f"{bucket}/study")
    rerun = _finish(_cli("study", str(path), "--output", uri, env=env))
    return S3Study(s3_server, bucket, uri, after_kill, killed_code, rerun)


def test_object_store_driver_killed_mid_write_leaves_no_object_visible(s3_study):
    assert s3_study.killed_code == -signal.SIGKILL
    # Killed with a steps file's bytes in its stream: the bucket holds no steps object.
    assert s3_study.after_kill == [f"{s3_study.bucket}/study/config.yaml",
                                   f"{s3_study.bucket}/study/trials.parquet"]  # fmt: skip


def test_object_store_rerun_ends_with_the_losses_of_each_point_alone(s3_study, seed_by_lr_losses):
    code, err = s3_study.rerun
    assert code == 0, err[-2000:]
    remote = pd.read_parquet(s3_study.uri.replace("/study?", "/study/steps?"))
    remote_losses = losses_by_point(remote, ["seed", "lr"])
    # Every grid point once, with the very losses it gives trained alone in this process.
    assert len(remote_losses) == 4
    for point, losses in remote_losses.items():
        assert np.array_equal(losses, seed_by_lr_losses[point]), point


def test_object_store_summarize_writes_the_summary_into_the_bucket(s3_study):
    env = s3_study.server.env()  # this time the endpoint from AWS_ENDPOINT_URL
    uri = f"s3://{s3_study.bucket}/study"
    code, err = _finish(_cli("summarize", uri, env=env))
    assert code == 0, err[-2000:]
    written = _objects(s3_study.server, f"{s3_study.bucket}/study")
    # The summary's table, text and plots are objects in the bucket.
    assert {f"{s3_study.bucket}/study/{name}" for name in ("summary.md", "summary.parquet")} <= set(
        written
    )
    assert any(name.endswith(".png") for name in written)


def test_object_store_steps_are_read_by_pandas_with_the_endpoint_from_the_environment(
    s3_study, monkeypatch
):
    for name, value in s3_study.server.env().items():
        monkeypatch.setenv(name, value)
    steps = pd.read_parquet(f"s3://{s3_study.bucket}/study/steps")
    # Four trials (one per grid point) of 200 windows, read by pandas straight from the bucket.
    assert steps.groupby("trial").size().tolist() == [200] * 4
    assert len(steps.groupby(["seed", "lr"])) == 4


STUDY = {
    "task": {"series_length": 1500},
    "model": {"num_layers": 1},
    "train": {"epochs": 1, "compile": False},
    "study": {"name": "bad", "search": {"task.echo_step": [1, 20]}, "only_writer": True},
}


def _refused(tmp_path, capsys, output: str, database: str, message: str) -> None:
    """The study command ends with one line holding `message`, exit code 2, and writes nothing:
    no journal table in the database (the output is checked first)."""
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**STUDY, "study": {**STUDY["study"], "storage": database}}))
    assert main(["study", str(path), "--output", output]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: output s3://"), err
    assert message in err, err
    with connect(database) as conn:
        (table,) = conn.execute(f"SELECT to_regclass('{TABLE}')").fetchone()
    assert table is None


def test_object_store_missing_bucket_is_one_line_exit_2(tmp_path, capsys, s3_env, database):
    _refused(tmp_path, capsys, "s3://no-such-bucket/study", database,
             "bucket 'no-such-bucket' does not exist at http://127.0.0.1:")  # fmt: skip


def test_object_store_no_credentials_is_one_line_exit_2(
    tmp_path, capsys, s3_server, s3_env, bucket, database, monkeypatch
):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws
    _refused(tmp_path, capsys, f"s3://{bucket}/study", database, "no S3 credentials")
    assert _objects(s3_server, bucket) == []


def test_object_store_endpoint_that_refuses_is_one_line_exit_2(
    tmp_path, capsys, s3_env, database, monkeypatch
):
    port = refusing_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    _refused(tmp_path, capsys, "s3://echo/study", database,
             f"no S3 endpoint answers at http://127.0.0.1:{port}")  # fmt: skip
