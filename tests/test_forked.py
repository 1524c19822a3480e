"""A forked child's bytes, and the parent's own work when the child fails (pipeline/forked.py)."""

from __future__ import annotations

import os
import signal

import pytest

from pipeline.summary.forked import start_in_child

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="forks only with two free cores on Linux",
)


def test_the_work_runs_in_a_child_and_its_bytes_come_back():
    parent = os.getpid()
    result = start_in_child(lambda: str(os.getpid()).encode() * 50_000)  # past a pipe's buffer
    got = result()
    child = got[: len(got) // 50_000]
    assert got == child * 50_000
    assert int(child) != parent


@pytest.mark.parametrize("how", ["raises", "killed"])
def test_a_failed_child_leaves_the_work_to_the_parent(how):
    parent = os.getpid()

    def work() -> bytes:
        if os.getpid() != parent:
            if how == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("the child's own failure")
        return b"the parent's"

    assert start_in_child(work)() == b"the parent's"


def test_an_error_in_the_parent_too_is_raised_there():
    def work() -> bytes:
        raise ValueError(f"from {os.getpid()}")

    with pytest.raises(ValueError, match=f"from {os.getpid()}$"):
        start_in_child(work)()
