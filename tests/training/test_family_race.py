"""The numba step's choice of kernel family per window shape: measured, not guessed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.config import ModelConfig
from pipeline.training import cpu_step, kernel_compile
from pipeline.training.arrays import State, WindowArrays, initial_weights
from pipeline.training.tapes import TAPE_POOL
from tests.conftest import copy_of_the_kernel_cache

# Trains 2 models of state 16 (1 layer) for 20 windows by `train`, with one family's kernels
# made slow for real: each call runs the kernel EXTRA more times on copies of its arguments
# first (20: with 8, the slowed one-model kernels ran only 1.2-1.5 times the time of the other
# family's at this shape, a margin the noise of a shared machine crossed). Prints the race's
# winner and how many windows each family ran.
_SLOWED_RUN = """
import json, sys
from pipeline.config import config_from_dict
from pipeline.training import cpu_step, kernel_compile
from pipeline.training.train import train

slow, EXTRA = sys.argv[1], 20
kernel_compile.compile_all()  # both families, loaded from the test's copy of the cache
windows = {cpu_step.BY_MODEL: 0, cpu_step.BY_LANE: 0}
original = cpu_step._family

def repeated(kernel):
    def run(*args):
        for _ in range(EXTRA):
            kernel(*[a.copy() for a in args])
        kernel(*args)
    return run

def counted(kernel, name):
    def run(*args):
        windows[name] += 1
        kernel(*args)
    return run

def family(kernels, by_model):
    chosen = original(kernels, by_model)
    name = cpu_step.BY_MODEL if by_model else cpu_step.BY_LANE
    chosen = chosen._replace(head=counted(chosen.head, name))
    if name == slow:
        chosen = chosen._replace(
            forward=repeated(chosen.forward), backward=repeated(chosen.backward)
        )
    return chosen

cpu_step._family = family
configs = [config_from_dict({
    "task": {"series_length": 750, "echo_step": 3, "batch_size": 5, "truncation": 15},
    "model": {"num_layers": 1, "state_size": 16},
    "train": {"epochs": 2, "lr": 0.3, "seed": seed, "device": "cpu"},
}) for seed in range(2)]
train(configs)
winners = list(cpu_step.measured_families().values())
print(json.dumps({"winners": winners, "windows": windows}))
"""


@pytest.mark.parametrize("slow", [cpu_step.BY_MODEL, cpu_step.BY_LANE])
def test_numba_step_keeps_the_family_measured_faster_when_one_is_forced_slow(tmp_path, slow):
    # At one shape (2 models of state 16, where the cost model expects the one-model kernels
    # to win), whichever family is made slow loses the race, and after the race every
    # window runs on the winner: the choice follows the measurement, not the cost model.
    env = {**os.environ, "NUMBA_CACHE_DIR": str(copy_of_the_kernel_cache(tmp_path / "cache"))}
    done = subprocess.run(
        [sys.executable, "-c", _SLOWED_RUN, slow],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ran = json.loads(done.stdout.strip().splitlines()[-1])
    fast = cpu_step.BY_LANE if slow == cpu_step.BY_MODEL else cpu_step.BY_MODEL
    # Racing first (by_model, the cost model's guess here), the slow family runs its untimed
    # window and its timed ones; racing second, it forfeits after its first window, many times
    # the other's. The 20 windows' rest ran on the other.
    raced = 1 + cpu_step.TIMED_WINDOWS if slow == cpu_step.BY_MODEL else 1
    assert ran == {"winners": [fast], "windows": {slow: raced, fast: 20 - raced}}


def test_race_way_far_slower_than_a_finished_way_forfeits_at_its_first_window():
    race = cpu_step.Race((cpu_step.BY_MODEL, cpu_step.BY_LANE))
    for seconds in (1.5, 1.0, 1.1):  # an untimed window, then the timed ones
        assert not race.record(cpu_step.BY_MODEL, seconds)
    # Within FORFEIT_RATIO of the best, a way's untimed window decides nothing ...
    assert not race.record(cpu_step.BY_LANE, 0.99 * cpu_step.FORFEIT_RATIO)
    assert race.winner is None and race.next_way() == cpu_step.BY_LANE
    # ... beyond it, even a timed one loses the race at once.
    assert race.record(cpu_step.BY_LANE, 1.01 * cpu_step.FORFEIT_RATIO)
    assert race.winner == cpu_step.BY_MODEL


def _arrays(models: int, units: int, layers: int) -> tuple[WindowArrays, np.ndarray]:
    weights = initial_weights(ModelConfig(num_layers=layers, state_size=units), list(range(models)))
    rng = np.random.default_rng(3)
    state = rng.uniform(-0.5, 0.5, (2, layers, 5, units, models)).astype(np.float32)
    arrays = WindowArrays(
        weights,
        [np.full_like(w, 0.1) for w in weights],
        State(state[0], state[1]),
        np.full(models, 0.3, np.float32),
        np.ones(models, np.bool_),
    )
    x = rng.integers(0, 2, (10, 5, 15, models)).astype(np.float32)
    return arrays, x


def test_numba_step_gives_the_same_bits_while_it_races_the_families(monkeypatch):
    # The first windows of a shape alternate between the families (a race), and with them the
    # weights' layout, here with lanes sitting out, so a model's losses, weights and state
    # must be those of a run on one family throughout.
    monkeypatch.setattr(cpu_step, "RACES", {})
    kernels = cpu_step.numba_kernels()
    for family in (cpu_step.BY_MODEL, cpu_step.BY_LANE):
        kernel_compile.require(family)
    runs = []
    for by_model in (None, True):
        arrays, xs = _arrays(models=20, units=8, layers=2)
        arrays.active[[3, -4, -3, -2, -1]] = False
        step, losses = cpu_step.numba_step(kernels, by_model=by_model), []
        for x in xs:
            loss, _, arrays = step(arrays, x, np.roll(x, 3, axis=1))
            losses.append(loss[arrays.active])  # (the families differ on those sitting out)
        runs.append([np.stack(losses), *arrays.weights, *arrays.accum, *arrays.state])
    race = next(iter(cpu_step.RACES.values()))
    assert race.winner is not None and len(race.ran) == 2
    # Each family ran windows, so the layout moved and back (a far slower one forfeits after
    # its first window, FORFEIT_RATIO).
    assert min(race.ran.values()) >= 1
    assert np.isfinite(runs[0][0]).all()
    for raced, one_family in zip(*runs, strict=True):
        assert np.array_equal(raced, one_family)


def test_numba_step_moves_the_weights_layout_only_when_the_family_changes():
    # The one-model kernels hand the lanes (..., K) views of model-first storage, and take
    # them again next window without a copy; a lane written through such a view (a trial
    # starting there) trains from what was written; the other family moves them back.
    kernels = cpu_step.numba_kernels()
    for family in (cpu_step.BY_MODEL, cpu_step.BY_LANE):
        kernel_compile.require(family)
    arrays, xs = _arrays(models=6, units=8, layers=2)
    by_model = cpu_step.numba_step(kernels, by_model=True)
    _, _, arrays = by_model(arrays, xs[0], xs[1])
    storage = [np.moveaxis(w, -1, 0) for w in arrays.weights]
    laid_out = zip(storage, arrays.weights, strict=True)
    assert all(s.flags.c_contiguous and not w.flags.c_contiguous for s, w in laid_out)
    fresh = initial_weights(ModelConfig(num_layers=2, state_size=8), [99])
    for weight, accum, initial in zip(arrays.weights, arrays.accum, fresh, strict=True):
        weight[..., 2], accum[..., 2] = initial[..., 0], 0.1
    alone, _ = _arrays(models=1, units=8, layers=2)
    state = State(*(s[..., 2:3].copy() for s in arrays.state))
    alone = alone._replace(weights=fresh, state=state)
    loss, _, after = by_model(arrays, xs[2], xs[3])
    loss_alone, _, _ = by_model(alone, xs[2][..., 2:3], xs[3][..., 2:3])
    assert all(np.shares_memory(a, s) for a, s in zip(after.weights, storage, strict=True))
    assert loss[2] == loss_alone[0]
    _, _, by_lane_after = cpu_step.numba_step(kernels, by_model=False)(after, xs[4], xs[5])
    assert all(w.flags.c_contiguous for w in by_lane_after.weights)


def test_numba_step_expects_the_family_a_race_kept_for_new_lanes(monkeypatch):
    # Lanes lay out their weights for the family their windows will run: before any race the
    # cost model's guess (the one-model kernels, at 4 models of state 8), after a race on
    # such windows its winner, here the other family.
    monkeypatch.setattr(cpu_step, "RACES", {})
    step = cpu_step.numba_step(cpu_step.numba_kernels())
    assert step.stores_models_first(layers=2, units=8, models=4)
    race = cpu_step.Race((cpu_step.BY_MODEL, cpu_step.BY_LANE))
    race.winner = cpu_step.BY_LANE
    cpu_step.RACES[cpu_step.WindowShape(2, 5, 15, 8, 4, 4)] = race
    assert not step.stores_models_first(layers=2, units=8, models=4)


def _window_tapes(step) -> list[np.ndarray]:
    """The tapes a numba step (forced to one family) took for its windows."""
    return step._window.keywords["tapes"].kept


def test_numba_step_takes_the_tapes_a_step_gone_left_behind():
    kernels = cpu_step.numba_kernels()
    kernel_compile.require(cpu_step.BY_MODEL)
    TAPE_POOL.clear()
    arrays, xs = _arrays(models=6, units=8, layers=2)
    first = cpu_step.numba_step(kernels, by_model=True)
    first(arrays, xs[0], xs[1])
    tapes = list(_window_tapes(first))
    del first  # its lanes are gone (a `train` returned)
    arrays, xs = _arrays(models=6, units=8, layers=2)
    second = cpu_step.numba_step(kernels, by_model=True)
    second(arrays, xs[0], xs[1])
    # The next step of that shape writes into the tapes the first paged in, not fresh ones.
    assert len(tapes) > 0
    assert all(a is b for a, b in zip(_window_tapes(second), tapes, strict=True))


def test_numba_step_never_shares_its_tapes_with_a_step_alive():
    kernels = cpu_step.numba_kernels()
    kernel_compile.require(cpu_step.BY_MODEL)
    steps = [cpu_step.numba_step(kernels, by_model=True) for _ in range(2)]
    for step in steps:
        arrays, xs = _arrays(models=6, units=8, layers=2)
        step(arrays, xs[0], xs[1])
    # Two sets of lanes may step in threads side by side: each writes tapes of its own.
    mine, theirs = (_window_tapes(step) for step in steps)
    assert not any(np.shares_memory(a, b) for a in mine for b in theirs)


def test_numba_step_moves_lanes_model_first_value_for_value():
    # The move to the one-model kernels' layout runs block by block (here two whole blocks
    # and a part of one, 7 models): every model's floats land where a plain copy puts them.
    lanes = np.random.default_rng(5).standard_normal((9, 130, 7)).astype(np.float32)
    moved = cpu_step._models_first_view(lanes)
    assert 2 * cpu_step.TRANSPOSE_ROWS < 9 * 130 < 3 * cpu_step.TRANSPOSE_ROWS
    assert np.moveaxis(moved, -1, 0).flags.c_contiguous
    assert np.array_equal(moved, lanes) and not np.shares_memory(moved, lanes)
