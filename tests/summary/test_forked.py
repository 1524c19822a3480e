"""A forked child's bytes, and the parent's own work when the child fails (summary/forked.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from pipeline.summary.forked import start_in_child

LINUX = hasattr(os, "sched_getaffinity")
# Forking needs two free cores; on a runner with fewer, these tests say so by name when skipped,
# and test_one_core_* below still checks what happens there.
two_cores = pytest.mark.skipif(
    not LINUX or len(os.sched_getaffinity(0)) < 2, reason="forks only with two free cores on Linux"
)


@two_cores
def test_the_work_runs_in_a_child_and_its_bytes_come_back():
    parent = os.getpid()
    result = start_in_child(lambda: str(os.getpid()).encode() * 50_000)  # past a pipe's buffer
    got = result()
    child = got[: len(got) // 50_000]
    assert got == child * 50_000
    # The bytes are the child's: another process computed them.
    assert int(child) != parent


@two_cores
@pytest.mark.parametrize("how", ["raises", "killed"])
def test_a_failed_child_leaves_the_work_to_the_parent(tmp_path, how):
    parent = os.getpid()
    mark = tmp_path / "child-ran"

    def work() -> bytes:
        if os.getpid() != parent:
            mark.write_text(str(os.getpid()))
            if how == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("the child's own failure")
        return b"the parent's"

    # A child ran and failed, and the parent did the work itself.
    assert start_in_child(work)() == b"the parent's"
    assert int(mark.read_text()) != parent


@two_cores
def test_an_error_in_the_parent_too_is_raised_there(tmp_path):
    mark = tmp_path / "raised-in"

    def work() -> bytes:
        with mark.open("a") as out:
            out.write(f"{os.getpid()}\n")
        raise ValueError(f"from {os.getpid()}")

    with pytest.raises(ValueError, match=f"from {os.getpid()}$"):
        start_in_child(work)()
    # Raised in the child first, then in the parent, whose error is the one raised.
    assert len(set(Path(mark).read_text().split())) == 2


@pytest.mark.skipif(not LINUX, reason="core affinity is Linux's")
def test_one_core_does_the_work_in_this_process():
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        result = start_in_child(lambda: str(os.getpid()).encode())
    finally:
        os.sched_setaffinity(0, cores)
    # With one free core a fork gains nothing: the work runs here.
    assert result() == str(os.getpid()).encode()
