"""How often a running study writes its results (README, Results): the first finished trial at
once, then at most one steps file a second, and trials.parquet at most every 10 s. One real
in-process study, its files watched as it runs: trials of one lane per trainer finish one by
one, several a second, so every rule has a chance to be broken."""

from __future__ import annotations

import itertools
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.results.output import TRIALS
from tests.conftest import study_config

# The trials' count is the last number of a steps file's name: trials-0000042-17.parquet.
GROUP_SIZE = re.compile(r"-(\d+)\.parquet$")


@dataclass(frozen=True)
class WatchedStudy:
    steps_files: list[tuple[float, int]]
    """Each steps file's last write (seconds) and its trials' count, in the order written."""
    trials_table_writes: list[float]
    """Each version of trials.parquet seen while the study ran and after it, by its last
    write (seconds), in order."""
    trials: int


def _trials_table_versions(path: Path, done: threading.Event, seen: set) -> None:
    """Note every version of trials.parquet (each is a new file, renamed into place) until
    `done`, looking every 10 ms: far more often than any rule here allows it to change."""
    while not done.wait(0.01):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            continue
        seen.add((stat.st_ino, stat.st_mtime_ns))


@pytest.fixture(scope="module")
def watched_study(tmp_path_factory, ray_session) -> WatchedStudy:
    from pipeline.study.driver import run_study

    # 40 trials of 2,000 windows on the numba kernels, one lane per trainer: they finish one
    # at a time, several a second, for 5 s or more. (Of 200 windows, on a fast machine all 40
    # finished within 0.7 s of the first: two steps files; of 1,000, in 2.5 s: four.)
    config = study_config(
        tmp_path_factory.mktemp("cadence"),
        search={"task.echo_step": list(range(1, 11)), "model.state_size": [3, 4],
                "train.seed": [0, 1]},
        **{"study.lanes_per_trainer": 1, "train.compile": True, "train.epochs": 20},
    )  # fmt: skip
    output = Path(config.output)
    seen: set[tuple[int, int]] = set()
    done = threading.Event()
    watcher = threading.Thread(
        target=_trials_table_versions, args=(output / TRIALS, done, seen), daemon=True
    )
    watcher.start()
    try:
        run_study(config, progress=False)
    finally:
        done.set()
        watcher.join()
    last = os.stat(output / TRIALS)
    seen.add((last.st_ino, last.st_mtime_ns))
    files = sorted((output / "steps").glob("*.parquet"), key=lambda f: f.stat().st_mtime_ns)
    return WatchedStudy(
        steps_files=[
            (f.stat().st_mtime_ns / 1e9, int(GROUP_SIZE.search(f.name).group(1))) for f in files
        ],
        trials_table_writes=sorted(mtime / 1e9 for _, mtime in seen),
        trials=config.study.n_trials,
    )


def test_record_cadence_first_finished_trial_is_written_at_once(watched_study):
    counts = [count for _, count in watched_study.steps_files]
    assert sum(counts) == watched_study.trials
    # The first group holds only what finished in the driver's first look at its two
    # trainers (one lane each), not what finished in the second that follows.
    assert counts[0] <= 2, counts


def test_record_cadence_at_most_one_steps_file_a_second(watched_study):
    written = [mtime for mtime, _ in watched_study.steps_files]
    # Grouped at all: trials finish several a second, and fewer files than trials came of it.
    assert 3 <= len(written) < watched_study.trials, watched_study.steps_files
    gaps = [later - earlier for earlier, later in itertools.pairwise(written[:-1])]
    # A group starts a second or more after the one before; a file's last write comes as
    # long after its start as the group takes to write (tens of ms on a loaded machine), so
    # the gaps between last writes may fall short of that by as much. The study's end writes
    # what is left at once.
    assert min(gaps) >= 0.75, gaps


def test_record_cadence_trials_table_is_rewritten_at_most_every_10_s(watched_study):
    writes = watched_study.trials_table_writes
    assert len(watched_study.steps_files) >= 3  # trials were recorded while the study ran
    # Written as the study starts, then not again within 10 s of that (the steps files'
    # footers hold the rows meanwhile), and once at its end.
    assert all(later - earlier >= 10 for earlier, later in itertools.pairwise(writes[:-1])), writes
