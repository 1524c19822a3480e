"""Work done in a forked child on another core, its bytes handed back through a pipe.

The summary draws its figures at the end of a study, when the trainers are done and the
machine's other cores stand idle; a thread would not help (drawing holds the GIL), and a fresh
process would spend a second importing pandas and matplotlib again. A fork starts in a few
milliseconds with everything imported. The child only computes and writes bytes to its pipe:
it never touches Ray or the output folder, and leaves by os._exit, running no exit handler of
the parent's libraries.

Whatever goes wrong in the child (an exception, a crash, a kill) costs only time: the parent
then does the work itself, so the result, or the error it raises, is the parent's own.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable


def start_in_child(work: Callable[[], bytes]) -> Callable[[], bytes]:
    """Start `work` in a forked child and return a function that waits for its bytes.

    Only on Linux (where os.sched_getaffinity tells the free cores), with two cores or more:
    elsewhere nothing starts, and the returned function runs `work` itself. A caller that
    drops the returned function unread closes the pipe with it, and the child, its writes
    refused, exits."""
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        return work
    readable, writable = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that a fork of a threaded process may deadlock in a child that
        # takes a lock another thread held: this child takes none that the driver's other
        # threads (Ray's, the progress bar's) use, and Python renews its own after a fork.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        _run_child(work, readable, writable)
    os.close(writable)
    pipe = os.fdopen(readable, "rb")

    def result() -> bytes:
        with pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        return data if os.waitstatus_to_exitcode(status) == 0 else work()

    return result


def _run_child(work: Callable[[], bytes], readable: int, writable: int) -> None:
    code = 1
    try:
        os.close(readable)
        data = work()
        with os.fdopen(writable, "wb") as pipe:
            pipe.write(data)
        code = 0
    finally:
        os._exit(code)
