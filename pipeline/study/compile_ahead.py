"""Compile ahead the CPU kernels a study will want, while the driver starts everything else.

On a machine whose kernel cache (kernel_cache.py) lacks them, the trainers would otherwise
start, find nothing to train with, and compile: about 4 s of a core per family, the largest
part of a cold study's start. The driver knows from its config alone which families its
windows will want (`kernel_families`), so it starts their compile at once, before it imports
Optuna, pandas and Ray (`python -m pipeline study` calls `start` straight after reading the
config): the compile then runs beside those imports and Ray's start, on cores that would
otherwise wait.

This module imports neither numba nor torch nor Ray: it only starts processes.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from pipeline.config import Config, ModelConfig
from pipeline.training import kernel_cache
from pipeline.training.cost import COST_KEYS, models_to_vectorize_over

# Layer-model-windows (a model's window, times its layers) that repay compiling the kernels
# vectorized over the models (about 5 s of a core) where one model at a time would do: past
# the switch they save about 10-18 µs a model-window at 3 layers (states 4 and 8, K = 16-32,
# one core, after the one-model kernels' blocked sums), about 4 µs a layer-model-window, so
# about 1.3 million of them.
LANE_FAMILY_PAYBACK = 1_300_000

_KERNEL_COMPILE = "import pipeline.training.kernel_compile as k"


def start(config: Config) -> None:
    """With Ray embedded (launch.prepare decides) on a machine whose cache lacks the CPU kernels
    that the study wants (`kernel_families`), start compiling them, in a process per family
    (see `kernel_compile.compile_all`), so the families compile at once; the trainers, starting
    a second or two later, then load the kernels from the cache instead of compiling them
    (`kernel_compile.load_only_cached`). One process compiling the families in turn made a cold
    configs/study.yaml slower (34.3 and 35.5 s against 32.9 and 34.2).

    Processes, not a thread of the driver: numba compiles mostly in Python, holding the GIL,
    and a compiling thread delayed the driver's own work (starting Ray and its trainers) by
    seconds. A warm machine skips it all. So does a device set to CUDA: asking torch whether
    "auto" finds a GPU would import torch into the driver, most of a second, while compiling in
    vain on a GPU machine costs only cores that wait for Ray anyway."""
    if config.train.compile is False:
        return
    families = kernel_families(config)
    if config.train.device.startswith("cuda") or kernel_cache.compiled(families):
        return
    # kernels.py itself, not cpu_step.numba_kernels: the same compile without torch. A
    # failure is the trainers' to report: each falls back and says so.
    compiling = [
        subprocess.Popen(
            [sys.executable, "-c", f"{_KERNEL_COMPILE}; k.compile_all({families!r})"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[1],
        )
        for _ in families
    ]
    threading.Thread(target=lambda: [p.wait() for p in compiling], daemon=True).start()


def kernel_families(config: Config) -> tuple[str, ...]:
    """The families of CPU kernels that a study's windows will want (kernels.py).

    For a grid, from its plan: each architecture with all of its trials in one trainer's lanes
    (as placement tends to put them); the kernels vectorized over the models only where lanes
    reach the count at which they are the faster ones and the windows they would run (times
    the layers) repay their compile. A first study of a few trials per architecture trains on
    the kernels that run one model at a time, compiled in less time. Other samplers: both."""
    if config.study.sampler != "grid":
        return kernel_cache.FAMILY_NAMES
    by_lane_work, by_model_wanted = 0, False
    for (model, windows), trials in _architectures(config).items():
        if trials >= models_to_vectorize_over(model.state_size):
            by_lane_work += trials * windows * model.num_layers
        else:
            by_model_wanted = True
    by_lane_wanted = by_lane_work >= LANE_FAMILY_PAYBACK
    wanted = {"by_model": by_model_wanted or not by_lane_wanted, "by_lane": by_lane_wanted}
    return tuple(family for family in kernel_cache.FAMILY_NAMES if wanted[family])


def _architectures(config: Config) -> Counter[tuple[ModelConfig, int]]:
    """A grid's trials counted by (model, windows each), without building a config per point:
    only the keys that shape a trial (COST_KEYS) are varied, each shape counting the points of
    the other keys."""
    search = config.study.search
    shaping = [p for p in search if p.key in COST_KEYS]
    others = math.prod(len(p.choices) for p in search if p.key not in COST_KEYS)
    counts: Counter[tuple[ModelConfig, int]] = Counter()
    for values in itertools.product(*(p.choices for p in shaping)):
        trial = config.with_params({p.key: v for p, v in zip(shaping, values, strict=True)})
        counts[trial.model, trial.total_steps] += others
    return counts
