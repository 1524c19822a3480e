"""The one-model-at-a-time kernels alone: their rate per core, and their bits against a snapshot.

Times `numba_step._windows_by` on the by_model family, a window a call (forward of every
layer, head, backward and Adagrad; no data generation or Python trainer around it), so that a
change to those kernels
shows without the trainer's overhead and noise. Weights are the trainer's initial ones, the
state and data random; each timed run is several windows in a row, best of --repeats, timed by
the thread's CPU time (the kernels run on it), so that other work on the machine moves the
figures less.

    python bench/by_model.py --states 4 8 16 --layers 1 3 --ks 1 6 28
    python bench/by_model.py --save snap.npz   # record every output of a few windows
    python bench/by_model.py --check snap.npz  # the same windows must give the same bits
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import this_checkout  # noqa: F401  (first on the path: this checkout's pipeline)

from pipeline.config import ModelConfig
from pipeline.training import cpu_step as numba_step
from pipeline.training import kernel_compile
from pipeline.training.arrays import State, WindowArrays, initial_weights
from pipeline.training.tapes import Tapes

BATCH, STEPS = 5, 15
# Shapes whose outputs the snapshot records: odd state sizes and K, and a model sitting out.
SNAPSHOT_SHAPES = [(16, 3, 3), (8, 2, 5), (4, 4, 2), (5, 2, 3), (3, 1, 1), (16, 1, 2), (12, 2, 2)]


Window = tuple[WindowArrays, np.ndarray, np.ndarray]
"""A window's arrays and its data x, y (B, T, K)."""


def window(units: int, layers: int, models: int, seed: int = 0) -> Window:
    """A window's arrays: the trainer's initial weights, a random state, data and targets."""
    config = ModelConfig(num_layers=layers, state_size=units)
    weights = initial_weights(config, list(range(models)))
    rng = np.random.default_rng(seed)
    state = rng.uniform(-0.5, 0.5, (2, layers, BATCH, units, models)).astype(np.float32)
    arrays = WindowArrays(
        weights=weights,
        accum=[np.full_like(w, 0.1) for w in weights],
        state=State(state[0].copy(), state[1].copy()),
        lr=np.full(models, 0.3, np.float32),
        active=np.ones(models, np.bool_),
    )
    x = rng.integers(0, 2, (BATCH, STEPS, models)).astype(np.float32)
    y = rng.integers(0, 2, (BATCH, STEPS, models)).astype(np.float32)
    return arrays, x, y


def rate(kernels, units: int, layers: int, models: int, windows: int, by_model: bool) -> float:
    """Model-windows per second of `windows` windows in a row."""
    family, tapes = numba_step._family(kernels, by_model), Tapes()
    a, x, y = window(units, layers, models)
    a = numba_step._laid_out(a, model_first=family.model_first)
    numba_step._windows_by(family, a, x[np.newaxis], y[np.newaxis], tapes)
    started = time.thread_time()  # this thread's CPU: the kernels run on it, whatever else runs
    for _ in range(windows):
        numba_step._windows_by(family, a, x[np.newaxis], y[np.newaxis], tapes)
    return models * windows / (time.thread_time() - started)


def outputs(kernels, by_model: bool) -> dict[str, np.ndarray]:
    """Every output of three windows in a row on each snapshot shape (one model inactive)."""
    family = numba_step._family(kernels, by_model)
    saved = {}
    for units, layers, models in SNAPSHOT_SHAPES:
        a, x, y = window(units, layers, models, seed=units * 100 + models)
        a = numba_step._laid_out(a, model_first=family.model_first)
        a.active[-1] = models == 1 or units % 2 == 0
        for w in range(3):
            losses, margin, still = numba_step._windows_by(
                family, a, x[np.newaxis], y[np.newaxis], Tapes()
            )
            losses = losses[0]
            key = f"{units}-{layers}-{models}-{w}"
            saved |= {f"{key}-losses": losses, f"{key}-margin": margin, f"{key}-still": still}
        for name, arrays in (("w", a.weights), ("acc", a.accum), ("h", [a.state.h]),
                             ("c", [a.state.c])):  # fmt: skip
            for i, array in enumerate(arrays):
                saved[f"{units}-{layers}-{models}-{name}{i}"] = array.copy()
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 6, 28])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-windows", type=int, default=3000, help="per timed run")
    parser.add_argument("--by-lane", action="store_true", help="time the other family")
    parser.add_argument("--save", help="write the snapshot of by_model's outputs here")
    parser.add_argument("--check", help="compare by_model's outputs with this snapshot")
    args = parser.parse_args()
    kernels = numba_step.numba_kernels()
    for family in kernels.FAMILIES:
        kernel_compile.require(family)
    if args.save or args.check:
        got = outputs(kernels, by_model=True)
        if args.save:
            np.savez(args.save, **got)
        if args.check:
            want = np.load(args.check)
            bad = [k for k in want.files if want[k].tobytes() != got[k].tobytes()]
            same = len(want.files) - len(bad)
            print(f"{same} of {len(want.files)} arrays the same bits", bad[:5])
        return
    for units in args.states:
        for layers in args.layers:
            for models in args.ks:
                windows = max(1, args.model_windows // models)
                best = max(
                    rate(kernels, units, layers, models, windows, not args.by_lane)
                    for _ in range(args.repeats)
                )
                print(f"state {units:2} layers {layers} K {models:3}: {best:9,.0f} win/s")


if __name__ == "__main__":
    main()
