"""Trials flowing through lanes: joining busy trainers, freeing lanes, and a sampler that learns."""

import contextlib
import json
import resource

import numpy as np
import optuna
import psutil
import pytest
import torch

from pipeline.results.output import Output
from pipeline.study.driver import run_study
from pipeline.study.optuna_setup import JOURNAL
from pipeline.training import cpu_step
from pipeline.training.device import step_function
from pipeline.training.lanes import LANES, Lanes
from pipeline.training.trial import LaneTrial
from tests.conftest import python_output, small_config, study_config, train_alone

CPU = torch.device("cpu")


def _config(**params: object):
    """A small config on the numba kernels, which compute each lane alone."""
    return small_config(**{"train.compile": True, **params})


def _run_lanes(
    arrivals: list[tuple[int, object]], capacities: list[int] | None = None
) -> dict[int, np.ndarray]:
    """Train trials that join one trainer at the given windows; their losses by arrival index
    (and the trainer's lanes after each window in `capacities`)."""
    first = arrivals[0][1]
    lanes = Lanes(first, step_function(first.train.compile, CPU), CPU)
    waiting = sorted(enumerate(arrivals), key=lambda item: item[1][0])
    losses, window = {}, 0
    with torch.inference_mode():
        while waiting or len(lanes):
            while waiting and waiting[0][1][0] <= window:
                key, (_, config) = waiting.pop(0)
                lanes.admit(LaneTrial(key, config))
            finished, _ = lanes.step()
            losses.update({f.key: f.losses for f in finished})
            window += 1
            if capacities is not None:
                capacities.append(lanes.capacity)
    return losses


def test_lanes_trial_joining_a_busy_trainer_midway_gives_its_losses_alone():
    target = _config(**{"train.seed": 7, "task.echo_step": 2, "train.lr": 0.5})
    assert step_function(target.train.compile, CPU).backend == "numba"
    alone = _run_lanes([(0, target)])[0]
    # Twenty others of other seeds, echo steps and rates, some leaving before it ends: it
    # joins at window 13, in the middle of their first epoch, at their own positions.
    others = [
        (3 * k % 7, _config(**{"train.seed": k, "task.echo_step": 1 + k % 5, "train.lr": 0.1}))
        for k in range(20)
    ]
    busy = _run_lanes([*others, (13, target)])[len(others)]
    assert len(alone) == target.total_steps
    assert np.array_equal(busy, alone)


def test_lanes_of_a_trainer_on_the_cpu_train_without_importing_torch():
    # A trainer on the CPU steps its lanes with the numba kernels on numpy arrays: torch, most
    # of a second to import at every trainer's start, is never loaded. Its trial's losses are
    # those the same lanes give here, where torch is loaded.
    config = _config(**{"train.seed": 3, "train.device": "cpu"})
    script = """
import json, sys
from tests.conftest import small_config, train_alone
from pipeline.training.device import window_step
config = small_config(**{"train.compile": True, "train.seed": 3, "train.device": "cpu"})
losses = train_alone(config)
print(json.dumps({"torch": "torch" in sys.modules, "losses": losses.tolist(),
                  "arrays": window_step(config, threads=1, gpu_from_ray=False)[0].arrays}))
"""
    trained = json.loads(python_output(script).strip().splitlines()[-1])
    assert trained["torch"] is False and trained["arrays"] == "numpy"
    assert len(trained["losses"]) == config.total_steps
    assert np.array_equal(np.float32(trained["losses"]), _run_lanes([(0, config)])[0])


def test_lanes_free_lane_takes_the_next_trial_at_the_next_window():
    configs = [_config(**{"train.seed": s, "train.epochs": e}) for s, e in [(1, 1), (2, 2)]]
    lanes = Lanes(configs[0], step_function(True, CPU), CPU)
    lanes.admit(LaneTrial(0, configs[0]))
    for _ in range(configs[0].total_steps - 1):
        assert lanes.step() == ([], [])
    (done,), _ = lanes.step()
    assert done.key == 0 and done.status == "complete" and len(lanes) == 0
    # The lane it left is the one the next trial gets: nothing grew.
    capacity = lanes.capacity
    lanes.admit(LaneTrial(1, configs[1]))
    assert lanes.capacity == capacity and lanes.occupied[0]


def test_lanes_waiting_lane_trains_no_window_until_ruled_on():
    config = _config()
    lanes = Lanes(config, step_function(True, CPU), CPU, report_every=5, judge_from=0)
    lanes.admit(LaneTrial(0, config))
    reports = []
    for _ in range(5):
        reports += lanes.step()[1]
    assert [(r.key, r.step) for r in reports] == [(0, 4)]
    assert lanes.step() == ([], []) and lanes.position[0] == 5
    (pruned,) = lanes.stop([0])
    assert pruned.status == "pruned" and len(pruned.losses) == 5


def test_lanes_in_blocks_of_windows_give_every_trial_what_a_window_a_step_gives(monkeypatch):
    # A step of up to 4 windows (the numba step's blocks, chunk by chunk: chunks of 2 lanes
    # here) stops at every lane's epoch end, trial end and report: each trial's losses,
    # status and reports are those of a window a step. Trials arrive midway, one diverges,
    # and the pruner stops one at its first report.
    monkeypatch.setattr(cpu_step, "MIN_CHUNK_LANES", 2)
    monkeypatch.setattr(cpu_step, "CHUNK_BYTES", 1)
    arrivals = [
        (3 * k, _config(**{"train.seed": k, "task.echo_step": 1 + k % 4, "train.lr": 0.2}))
        for k in range(5)
    ]
    arrivals.append((5, _config(**{"train.seed": 9, "train.lr": 1e30})))
    pruned = {2}
    runs = {block: _run_blocks(arrivals, block, pruned) for block in (1, 4)}
    (one_finished, one_reports, one_blocks), (finished, reports, blocks) = runs.values()
    assert set(one_blocks) == {1} and max(blocks) == 4
    assert one_reports == reports and {key for key, _, _ in reports} >= pruned
    assert sorted(finished) == list(range(6))
    assert {key: status for key, (_, status) in finished.items()} == {
        key: status for key, (_, status) in one_finished.items()
    }
    assert finished[5][1] == "diverged" and finished[2][1] == "pruned"
    for key, (losses, _) in finished.items():
        assert np.array_equal(losses, one_finished[key][0], equal_nan=True)


def test_lanes_step_in_blocks_beside_a_trial_waiting_at_its_epochs_last_window():
    # A trial waiting for a verdict at the last window of its epoch (window 19 of 20) trains
    # nothing, while a trial beside it takes a block of 4 windows; then it goes on with the
    # losses it has alone.
    waiting, beside = (_config(**{"train.seed": s}) for s in (1, 2))
    step = cpu_step.numba_step(cpu_step.numba_kernels(), by_model=True)
    lanes = Lanes(waiting, step, CPU, report_every=19, judge_from=0, block_windows=4)
    lanes.admit(LaneTrial(0, waiting))
    reports = []
    while not reports:
        reports = lanes.step()[1]
    assert [(r.key, r.step) for r in reports] == [(0, 18)] and lanes.position[0] == 19
    lanes.admit(LaneTrial(1, beside))
    lanes.step()
    assert lanes.last_windows == 4 and lanes.position[0] == 19
    lanes.resume([0])
    finished = {}
    while len(lanes):
        done, due = lanes.step()
        lanes.resume(r.key for r in due)
        finished.update({f.key: f.losses for f in done})
    assert np.array_equal(finished[0], train_alone(waiting))
    assert np.array_equal(finished[1], train_alone(beside))


def _run_blocks(arrivals: list[tuple[int, object]], block: int, pruned: set[int]) -> tuple:
    """Trials joining one trainer's lanes after the given steps, stepped in blocks of up to
    `block` windows, reporting every 7 steps and stopped at their first report if `pruned`:
    (key: (losses, status)), the reports (key, step, value) and the windows of each step."""
    first = arrivals[0][1]
    step = cpu_step.numba_step(cpu_step.numba_kernels(), by_model=True)  # chunk by chunk
    lanes = Lanes(first, step, CPU, 7, 3, block_windows=block)
    waiting = sorted(enumerate(arrivals), key=lambda item: item[1][0])
    finished, reports, blocks = {}, [], []
    while waiting or len(lanes):
        while waiting and waiting[0][1][0] <= len(blocks):
            key, (_, config) = waiting.pop(0)
            lanes.admit(LaneTrial(key, config))
        done, due = lanes.step()
        blocks.append(lanes.last_windows)
        reports += [(r.key, r.step, r.value) for r in due]
        done += lanes.stop([r.key for r in due if r.key in pruned])
        lanes.resume([r.key for r in due if r.key not in pruned])
        finished.update({f.key: (f.losses, f.status) for f in done})
    return finished, sorted(reports), [b for b in blocks if b]


def test_study_tpe_asks_each_trial_after_the_earlier_ones_were_told(tmp_path, ray_session):
    search = {"train.lr": {"low": 0.05, "high": 1.0, "log": True}, "task.echo_step": [1, 2]}
    config = study_config(
        tmp_path,
        **{
            "study.sampler": "tpe",
            "study.search": search,
            "study.trials": 8,
            "study.lanes_per_trainer": 1,
        },
    )
    run_study(config, progress=False)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(Output(config.output).path(JOURNAL))
    )
    trials = optuna.load_study(study_name=config.study.name, storage=storage).trials
    assert len(trials) == 8
    # Two trainers of one lane each: at most two trials run at once, so when trial n is
    # asked, all but at most one of the trials before it have been told.
    for trial in trials[2:]:
        told = sum(t.datetime_complete <= trial.datetime_start for t in trials[: trial.number])
        assert told >= trial.number - 1, (trial.number, told)


def test_lanes_packing_empty_lanes_keeps_every_running_trials_losses():
    # Twenty trials join (two vectors of lanes: the kernels vectorized over the models run
    # them); eighteen leave early (one epoch), so the lanes are packed to two while the two
    # long ones run on, one model at a time, from lanes 3 and 19 to 0 and 1 (then to one lane
    # for the last): their losses are those they have alone.
    short = [_config(**{"train.seed": s, "train.epochs": 1}) for s in range(18)]
    long = [_config(**{"train.seed": 30 + s, "task.echo_step": 2 + s}) for s in range(2)]
    arrivals = [(0, c) for c in short[:3]] + [(0, long[0])] + [(0, c) for c in short[3:]]
    arrivals.append((5, long[1]))
    capacities: list[int] = []
    together = _run_lanes(arrivals, capacities)
    assert max(capacities) == 2 * LANES and 2 in capacities and capacities[-1] == 1
    for index, config in [(3, long[0]), (19, long[1])]:
        assert np.array_equal(together[index], _run_lanes([(0, config)])[0])


def test_lanes_admission_that_raises_frees_its_lane():
    # 65,538 windows an epoch, the most the config allows.
    config = _config(**{"task.series_length": 5 * 15 * 65_538})
    lanes = Lanes(config, step_function(True, CPU), CPU)
    lanes.admit(LaneTrial(0, config))
    # 32,767 epochs of them: a loss trace of gigabytes, more than this process may map.
    huge = config.with_params({"train.epochs": 32_767, "train.seed": 1})
    with _address_space_limited(), pytest.raises(MemoryError):
        lanes.admit(LaneTrial(1, huge))
    lanes.step()  # a lane that the failed admission had taken fails here (IndexError)
    # The failed admission left no trial behind: only trial 0 holds a lane.
    assert list(lanes.lane_of) == [0] and int(lanes.occupied.sum()) == 1


@contextlib.contextmanager
def _address_space_limited():
    """This process may map only 512 MB more than it has mapped now (RLIMIT_AS): room for
    its threads, not for gigabytes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = psutil.Process().memory_info().vms
    resource.setrlimit(resource.RLIMIT_AS, (mapped + 512 * 2**20, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _lanes_on_one_family(by_model: bool, trials: int) -> Lanes:
    """Lanes on the numba step forced to one family, holding `trials` small trials."""
    from pipeline.training import cpu_step, kernel_compile

    kernel_compile.require(cpu_step.BY_MODEL if by_model else cpu_step.BY_LANE)
    step = cpu_step.numba_step(cpu_step.numba_kernels(), by_model=by_model)
    config = _config()
    lanes = Lanes(config, step, "cpu")
    for key in range(trials):
        lanes.admit(LaneTrial(key, config.with_params({"train.seed": key})))
    return lanes


def _model_first(arrays: list[np.ndarray]) -> bool:
    """Whether every (..., K) array is a view of C-contiguous (K, ...) storage."""
    return all(np.moveaxis(a, -1, 0).flags.c_contiguous for a in arrays)


def test_lanes_hold_the_one_model_kernels_weights_model_first_from_admission():
    lanes = _lanes_on_one_family(by_model=True, trials=3)
    storage = [np.moveaxis(a, -1, 0) for a in lanes.weights + lanes.accum]
    lanes.step()
    # Admitted trials' weights and accumulators are in the kernels' layout already, so the
    # first window trains them where they are: it moves (copies) none.
    assert _model_first(lanes.weights + lanes.accum)
    assert all(
        np.shares_memory(a, s) for a, s in zip(lanes.weights + lanes.accum, storage, strict=True)
    )


def test_lanes_resized_keep_the_one_model_kernels_weights_model_first():
    lanes = _lanes_on_one_family(by_model=True, trials=2)
    lanes.step()
    before = [a.copy() for a in lanes.weights + lanes.accum]
    lanes.reserve(5)  # grows the lanes: new storage
    # The lanes kept, in the layout the kernels take, with the values they had.
    assert lanes.capacity >= 5 and _model_first(lanes.weights + lanes.accum)
    after = lanes.weights + lanes.accum
    assert all(np.array_equal(a[..., :2], b) for a, b in zip(after, before, strict=True))


def test_lanes_hold_the_vectorized_kernels_weights_models_last():
    lanes = _lanes_on_one_family(by_model=False, trials=3)
    lanes.step()
    # The kernels vectorized over the models take (..., K) C-contiguous, as the lanes hold it.
    assert all(a.flags.c_contiguous for a in lanes.weights + lanes.accum)
