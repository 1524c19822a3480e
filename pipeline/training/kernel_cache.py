"""Where the numba kernels of kernels.py are cached, and whether this machine has them, told
without importing numba: the driver asks before Ray starts, and compiles ahead only when the
answer is no (on a warm machine, loading the kernels there would only compete with Ray's start
for the cores and the GIL, and the driver never trains).

The cache is keyed by the contents of kernels.py, not its path: `ray job submit` runs the
driver from a fresh copy of the working directory, at a new path every job, so a path-keyed
cache (numba's default, a __pycache__ beside the file) would compile again in every job, and
the copy may not be writable. Every copy of one version of the code, and every process on the
machine, shares one folder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
from pathlib import Path

FAMILY_NAMES = ("by_model", "by_lane")
"""kernels.py's families of kernels, each compiled as a whole; a process that needs one before
it knows its windows' shapes takes the first, which compiles faster (about 4.1 s of a core
against 5.0) and is the faster one for a few models (a `train` run, a first study's trainers)."""

KERNELS_SOURCES = tuple(
    Path(__file__).with_name(name) for name in ("kernels.py", "kernel_tiles.py")
)
"""The kernels, and the IR that is compiled into them."""


def cache_dir() -> Path:
    """The root of the kernels' cache: NUMBA_CACHE_DIR when the user set one, else
    ~/.cache/echo-study/numba (under XDG_CACHE_HOME when set)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "echo-study" / "numba"


@functools.cache
def source_hash() -> str:
    """The hash of the kernels' sources' contents, which keys their cache."""
    digest = hashlib.sha256()
    for source in KERNELS_SOURCES:
        digest.update(source.read_bytes())
    return digest.hexdigest()


def kernels_folder() -> Path:
    """The cache folder of this version of kernels.py."""
    return cache_dir() / f"kernels-{source_hash()[:16]}"


def mark_compiled(family: str) -> None:
    """Note that `family` is compiled and cached for this machine's CPU (best effort: an
    unwritable cache only means the next study compiles ahead again)."""
    with contextlib.suppress(OSError):
        _marker(family).touch()


def compiled(families: tuple[str, ...] = FAMILY_NAMES) -> bool:
    """Whether every family is in the cache for this machine's CPU. Numba keys each entry by
    CPU model and features too, so nodes of a mixed cluster that share a home folder do not
    mix machine code; the markers follow the same key, as /proc/cpuinfo tells it."""
    return all(_marker(family).exists() for family in families)


def _marker(family: str) -> Path:
    return kernels_folder() / f"compiled-{family}-{_cpu_key()}"


@functools.cache
def _cpu_key() -> str:
    """A short hash of this CPU's model and features."""
    described = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith(("model name", "flags"))]
        described += "".join(sorted(set(lines)))
    except OSError:
        pass
    return hashlib.sha256(described.encode()).hexdigest()[:12]
