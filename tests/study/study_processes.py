"""`python -m pipeline study` as a process of its own, for the tests that kill a driver: how to
start one, reap what its embedded Ray leaves, kill it at every moment of a study, and the
losses the same grid points give trained alone, to compare against."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import yaml

from pipeline.config import Config
from pipeline.results.failpoints import FAILPOINT, TRAINER_BREAK, TRAINER_FAILPOINT
from pipeline.results.output import Output
from pipeline.results.tables import read_steps_outcomes
from pipeline.training.data import trial_seed
from tests.conftest import train_alone

# One trial per trainer at a time, so that trials are asked and recorded in several groups.
TINY = {"task.series_length": 7500, "train.epochs": 2, "study.lanes_per_trainer": 1}
SEED_BY_LR = {"train.seed": [0, 1, 2], "train.lr": [0.1, 0.3, 1.0]}
"""The grid of the kill-and-rerun tests; other files take subsets of it."""

KILL_MOMENTS = ["asked:3", "recovering:1", "written:1", "told:2"]
"""Within a group of asks, within the recovery of the trials a dead driver left running,
between writing trials' steps and telling Optuna, and within a group of tells."""


def study_process(
    config_path: Path,
    output: Path | str,
    *args: str,
    failpoint: str | None = None,
    trainer_break: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """`python -m pipeline study` in a session of its own, so that what its embedded Ray leaves
    after a SIGKILL can be stopped by process group, never by a machine-wide kill."""
    child = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    for name in ("RAY_ADDRESS", FAILPOINT, TRAINER_FAILPOINT, TRAINER_BREAK):
        child.pop(name, None)
    if failpoint:
        child[FAILPOINT] = failpoint
    if trainer_break:
        child[TRAINER_BREAK] = trainer_break
    command = [sys.executable, "-m", "pipeline", "study", str(config_path), "--output", str(output)]
    return subprocess.Popen(
        [*command, *args], env=child, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip


def reap(process: subprocess.Popen) -> None:
    """Kill what is left of the process's session (its embedded Ray) and wait for it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """The process's exit code and stderr, once it ended; its session reaped either way."""
    try:
        _, err = process.communicate(timeout=timeout)
    finally:
        reap(process)
    return process.returncode, err


def write_config(folder: Path, config: Config) -> Path:
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


class Run(NamedTuple):
    """One run of a study process: its failpoint, its stderr, and how many trials' steps the
    output held when it ended."""

    failpoint: str | None
    err: str
    recorded: int


def kill_at_every_moment(config_path: Path, output: Path) -> list[Run]:
    """Run the study killed at each of KILL_MOMENTS in turn, then to its end. Fails unless
    each kill happened and the last run ended well."""
    runs = []
    for failpoint in [*KILL_MOMENTS, None]:
        code, err = finish(study_process(config_path, output, failpoint=failpoint))
        assert code == (-signal.SIGKILL if failpoint else 0), (failpoint, err[-2000:])
        runs.append(Run(failpoint, err, len(read_steps_outcomes(Output(str(output))))))
    return runs


def losses_by_point(steps: pd.DataFrame, keys: list[str]) -> dict[tuple, np.ndarray]:
    """Each grid point's losses in step order, from a study's steps/ table."""
    ordered = steps.sort_values(["trial", "step"])
    return {point: g["loss"].to_numpy() for point, g in ordered.groupby(keys)}


def losses_alone(config: Config, search: dict[str, list]) -> dict[tuple, np.ndarray]:
    """Each point of the grid `search` (two keys) trained alone in this process, with the seed
    a study gives it (from the study's seed and the point) and by the step a trainer takes: the
    losses a study of those points must record, whatever stopped it."""
    (first, values_a), (second, values_b) = search.items()
    losses = {}
    for a in values_a:
        for b in values_b:
            params = {first: a, second: b}
            point = config.with_params(params)
            seed = trial_seed(config.study.seed, {**params, "train.seed": point.train.seed})
            losses[(a, b)] = train_alone(point.with_params({"train.seed": seed}))
    return losses
