"""Compiling and loading the numba kernels' families (kernels.py), shared between processes.

Processes that start together on a cold machine (a study's trainers, and the driver's compile
ahead) share the work through a file lock per family beside the cache: each compiles a family
no other process is compiling, or waits for the one that does and loads what it cached. Both
families give a model the same bits, so a window may run on whichever is ready.

This lives apart from kernels.py, whose source keys the cache (kernel_cache.py): changing how
processes share a compile does not throw away the machine code.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Iterator, Sequence

from pipeline.training.arrays import warn_fallback
from pipeline.training.kernel_cache import FAMILY_NAMES, cache_dir, compiled, mark_compiled
from pipeline.training.kernels import FAMILIES


def compile_family(family: str) -> None:
    """Compile, or load from the cache, every kernel of `family`, for its one signature only."""
    for dispatcher, signature in FAMILIES[family]:
        dispatcher.compile(signature)
        dispatcher.disable_compile()
    _loaded.add(family)


# The families this process has compiled or loaded, and when it last looked for each other one.
_loaded: set[str] = set()


_looked: dict[str, float] = {}


LOOK_AGAIN_S = 0.25


_compile_missing = True
# Families whose compile raised in this process: never tried again.
_unusable: set[str] = set()


def load_only_cached() -> None:
    """From now on, take up only the families that are cached (or compiled by another process
    meanwhile), compiling one only when none is anywhere: for a trainer whose driver compiled
    ahead the families its study wants (compile_ahead.kernel_families)."""
    global _compile_missing
    _compile_missing = False


def ready(family: str) -> bool:
    """Whether `family` can run in this process without waiting on another: loaded already;
    else, when no other process is compiling it, loaded from the cache, or compiled now (unless
    `load_only_cached`). False while another process compiles it; a family found missing is
    looked for again at most every LOOK_AGAIN_S, so that a caller may ask before every window.

    Both families give a model the same bits, so a caller may run the other one meanwhile:
    what a trial computes does not depend on which family was ready when."""
    if family in _loaded:
        return True
    if not _look_again(family):
        return False
    with _compile_lock(family, wait=False) as held:
        if held and (_compile_missing or compiled((family,))):
            try:
                compile_family(family)
                mark_compiled(family)
            except Exception as error:  # e.g. a cache numba cannot write: the other family runs
                warn_fallback(f"numba's {family} kernels", error)
                _unusable.add(family)
    return family in _loaded


def _look_again(family: str) -> bool:
    """Whether to look for a family that is not loaded: never for one found unusable, and for
    one found missing at most every LOOK_AGAIN_S."""
    if family in _unusable:
        return False
    now = time.monotonic()
    if now - _looked.get(family, -LOOK_AGAIN_S) < LOOK_AGAIN_S:
        return False
    _looked[family] = now
    return True


def loaded_if_cached(family: str) -> bool:
    """Whether `family` is loaded, loading it first where it is cached and no other process
    holds its lock; never compiles, never waits. A family found missing is looked for again
    at most every LOOK_AGAIN_S, as in `ready`: for a window that would time both families
    (cpu_step.Race) only where both are at hand."""
    if family in _loaded:
        return True
    if not _look_again(family):
        return False
    if not compiled((family,)):
        return False
    with _compile_lock(family, wait=False) as held:
        if held:
            try:
                compile_family(family)  # loads: the marker says the cache has it
            except Exception as error:
                warn_fallback(f"numba's {family} kernels", error)
                _unusable.add(family)
    return family in _loaded


def first_ready(families: Sequence[str] = FAMILY_NAMES) -> str:
    """The first of `families` that is ready; when none is, the first that another process is
    compiling, as soon as it is done (waiting on its lock, which that process releases the
    moment the family is cached); when no process compiles any, the first cached one, else the
    first of them, compiled here."""
    for family in families:
        if ready(family):
            return family
    compiling = [family for family in families if _compiling_elsewhere(family)]
    cached = [family for family in families if compiled((family,))]
    family = (compiling or cached or list(families))[0]
    require(family)
    return family


def require(family: str) -> None:
    """Load or compile `family`, waiting for a process that compiles it."""
    if family not in _loaded:
        with _compile_lock(family, wait=True):
            compile_family(family)
            mark_compiled(family)


def _compiling_elsewhere(family: str) -> bool:
    with _compile_lock(family, wait=False) as held:
        return not held


def compile_all(families: Sequence[str] = FAMILY_NAMES) -> None:
    """Compile, or load from the cache, every family of kernels (or those named).

    Processes that start together on a cold machine (a study's trainers, and its driver that
    compiles ahead while Ray starts) share the work through a file lock per family beside the
    cache: each first compiles the families no other process is compiling, then waits for the
    others' and loads what they cached instead of compiling them again."""
    pending = list(families)
    for wait in (False, True):
        for family in list(pending):
            with _compile_lock(family, wait) as held:
                if held:
                    compile_family(family)
                    mark_compiled(family)
                    pending.remove(family)


@contextlib.contextmanager
def _compile_lock(family: str, wait: bool) -> Iterator[bool]:
    """Hold the lock of `family`'s compile, waiting for it or not; yields whether it is held
    (always, where the cache is not writable: there is nothing to share, so compile alone)."""
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"compile-{family}.lock", "a+")  # noqa: SIM115 (closed below)
    except OSError:
        yield True
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
