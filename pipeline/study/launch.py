"""What a study settles before Ray is imported, once, for every entry point (the command line
and `run_study` alike): whether Ray runs embedded on this machine or is a cluster to join, and
the compile ahead of a cold machine's CPU kernels.

This module imports neither Ray nor numba nor torch: the command line calls `prepare` straight
after reading the config, so that the compile runs beside the imports of Optuna, pandas and
Ray, on cores that would otherwise wait.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass

from pipeline.config import Config, ray_address
from pipeline.study import compile_ahead


@dataclass(frozen=True)
class Launch:
    """Where a study's trials run, decided once and passed down."""

    address: str | None
    """The cluster to join; None: Ray embedded on this machine, every server on 127.0.0.1."""

    @property
    def embedded(self) -> bool:
        return self.address is None


def prepare(config: Config) -> Launch:
    """Decide where the study runs; with Ray embedded, start compiling the CPU kernels the
    study wants, if this machine lacks them. (An embedded Ray's servers are kept on the loopback
    interface where it starts: ray_connection.start_embedded_ray.)"""
    launch = Launch(ray_address(config))
    if launch.embedded:
        compile_ahead.start(config)
    return launch


def import_in_background(module: str) -> None:
    """Import `module` in a thread of its own. While Ray starts, this process mostly waits on
    Ray's processes, and an import beside it (matplotlib, for the summary's figures: a quarter
    of a second) takes none of its time; a later import of the module waits for this one."""
    threading.Thread(target=importlib.import_module, args=(module,), daemon=True).start()
