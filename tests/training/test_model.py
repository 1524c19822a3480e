import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.training import cpu_step
from pipeline.training.arrays import (
    ADAGRAD_INITIAL_ACCUMULATOR,
    FORGET_BIAS,
    State,
    WindowArrays,
    WindowResult,
)
from pipeline.training.cpu_step import numba_kernels
from pipeline.training.device import step_function
from pipeline.training.torch_step import (
    forward,
    init_adagrad,
    init_state,
    init_weights,
    train_window,
)
from tests.conftest import copy_of_the_kernel_cache

CPU = torch.device("cpu")


def _window(models: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (5, 15, models), generator=generator).float()
    return x, torch.roll(x, 3, dims=1)


def _random_state(layers: int, units: int, models: int) -> State:
    generator = torch.Generator().manual_seed(1)
    shape = (layers, 5, units, models)
    return State(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))


def test_init_weights_follow_the_tutorials_tensorflow_init():
    weights = init_weights(ModelConfig(num_layers=2, state_size=4), seeds=[0, 1], device=CPU)
    w_input, w_hidden, bias = weights[3:6]  # the second layer
    limit = math.sqrt(6 / (4 + 4 + 16))  # Glorot over TF's joint [input + hidden, 4H] kernel
    assert w_input.abs().max() <= limit and w_hidden.abs().max() <= limit
    assert w_hidden.abs().max() > 0.8 * limit
    # Gates i, f, o, g: only the forget gate starts at 1.
    assert (
        torch.all(bias[4:8] == FORGET_BIAS)
        and torch.all(bias[:4] == 0)
        and torch.all(bias[8:] == 0)
    )
    w_out, b_out = weights[-2:]
    assert w_out.min() >= 0 and w_out.max() < 1 and torch.all(b_out == 0)


def test_init_weights_of_a_model_do_not_depend_on_its_batch():
    alone = init_weights(ModelConfig(), seeds=[42], device=CPU)
    batched = init_weights(ModelConfig(), seeds=[7, 42, 9], device=CPU)
    for a, b in zip(alone, batched, strict=True):
        assert torch.equal(a[..., 0], b[..., 1])
    assert not torch.equal(batched[0][..., 0], batched[0][..., 1])


@pytest.mark.parametrize("layers", [1, 3])
def test_train_window_update_matches_autograd_and_adagrad(layers):
    models, units = 3, 5
    weights = init_weights(ModelConfig(num_layers=layers, state_size=units), [1, 2, 3], CPU)
    accum = init_adagrad(weights)
    x, y = _window(models)
    state = _random_state(layers, units, models)
    lr = torch.tensor([0.3, 0.05, 1.0])
    active = torch.ones(models, dtype=torch.bool)
    losses, _, after = train_window(WindowArrays(weights, accum, state, lr, active), x, y)
    updated = after.weights

    reference, expected_weights = _autograd_window(weights, x, y, state, lr)
    torch.testing.assert_close(losses, reference, rtol=1e-6, atol=1e-7)
    for new, expected in zip(updated, expected_weights, strict=True):
        torch.testing.assert_close(new, expected, rtol=1e-5, atol=1e-6)


def test_compiled_step_compiles_and_follows_the_eager_step(caplog):
    # The torch.compile step is the GPU's. There is no GPU here, but inductor compiles the same
    # pieces for the CPU, and a change to them that it cannot trace (an out= into a slot of a
    # tape, say) would otherwise reach the GPU path unseen: the step would log a warning and
    # fall back to eager. One layer of 4 units (about 35 s of compile on a cold cache).
    from pipeline.training import torch_step

    weights, accum, state, lr, active = _models(4, layers=1, units=4)
    x, y = _window(4)

    def window(step):
        arrays = WindowArrays(_copy(weights), _copy(accum), State(*_copy(state)), lr, active)
        return step(arrays, x, y)

    eager = window(torch_step.eager_step())
    step = torch_step.inductor_step()
    compiled = window(step)
    assert step.compiled, caplog.text
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(compiled.arrays.weights, eager.arrays.weights, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _autograd_window(weights, x, y, state, lr):
    """The reference for a window's step: autograd through the same forward, the initial state
    a constant, then TensorFlow's Adagrad by hand; returns (losses, updated weights)."""
    leaves = [w.clone().requires_grad_(True) for w in weights]
    logits, _ = forward(leaves, x, state)
    log_p = torch.log_softmax(logits, dim=2)
    losses = -(log_p[:, :, 1] * y + log_p[:, :, 0] * (1 - y)).mean(dim=(0, 1))
    grads = torch.autograd.grad(losses.sum(), leaves)
    updated = [
        w - lr * g / torch.sqrt(ADAGRAD_INITIAL_ACCUMULATOR + g * g)
        for w, g in zip(weights, grads, strict=True)
    ]
    return losses.detach(), updated


def test_train_window_carries_a_state_without_a_graph_that_changes_the_next_loss():
    weights = init_weights(ModelConfig(), [0], CPU)
    accum = init_adagrad(weights)
    x, y = _window(1)
    active = torch.ones(1, dtype=torch.bool)
    lr = torch.tensor([0.3])
    zeros = init_state(weights, batch_size=5)
    _, _, after = train_window(WindowArrays(weights, accum, zeros, lr, active), x, y)
    weights, accum, carried = after.weights, after.accum, after.state
    # The state reaches the next window: it is not zero, and it holds no autograd graph.
    assert carried.h.abs().sum() > 0 and carried.c.abs().sum() > 0
    assert carried.h.grad_fn is None and not carried.h.requires_grad
    x2, y2 = _window(1, seed=1)
    # The same weights for both (a step may update those it is given in place).
    with_carry = train_window(
        WindowArrays(_copy(weights), _copy(accum), carried, lr, active), x2, y2
    ).losses
    without = train_window(WindowArrays(weights, accum, zeros, lr, active), x2, y2).losses
    assert not torch.equal(with_carry, without)


def test_train_window_freezes_a_model_whose_loss_is_not_finite():
    weights = init_weights(ModelConfig(), [0, 1], CPU)
    accum = init_adagrad(weights)
    x, y = _window(2)
    x[0, 0, 1] = float("nan")  # poisons model 1 only
    state = init_state(weights, batch_size=5)
    active = torch.ones(2, dtype=torch.bool)
    losses, _, after = train_window(
        WindowArrays(weights, accum, state, torch.tensor([0.3, 0.3]), active), x, y
    )
    updated, still_active = after.weights, after.active
    assert torch.isfinite(losses[0]) and not torch.isfinite(losses[1])
    assert still_active.tolist() == [True, False]
    for before, after in zip(weights, updated, strict=True):
        assert torch.equal(after[..., 1], before[..., 1])  # kept its last finite weights
        assert torch.all(torch.isfinite(after))
    assert not torch.equal(updated[1][..., 0], weights[1][..., 0])


def test_forward_gives_two_logits_per_step_and_model():
    weights = init_weights(ModelConfig(num_layers=2, state_size=3), [0, 1, 2, 3], CPU)
    x, _ = _window(4)
    logits, state = forward(weights, x, init_state(weights, 5))
    assert logits.shape == (5, 15, 2, 4)
    assert state.h.shape == state.c.shape == (2, 5, 3, 4)
    assert np.isfinite(logits.numpy()).all()


def _numba_step():
    step = step_function(True, CPU)
    assert step.backend == "numba" and step.compiled and step.arrays == "numpy"
    return _on_tensors(step)


def _on_tensors(step):
    """A step on numpy arrays, called with torch tensors and returning them, as torch's steps
    are (tensor and array share their memory: in-place updates show on both)."""
    if step.arrays != "numpy":
        return step

    def on_tensors(arrays, x, y):
        losses, margin, after = step(_map(arrays, torch.Tensor.numpy), x.numpy(), y.numpy())
        return WindowResult(
            torch.from_numpy(losses), torch.from_numpy(margin), _map(after, torch.from_numpy)
        )

    return on_tensors


def _map(arrays: WindowArrays, convert) -> WindowArrays:
    """The same window arrays, each converted (numpy arrays to tensors, or back)."""
    return WindowArrays(
        [convert(w) for w in arrays.weights],
        [convert(a) for a in arrays.accum],
        State(*(convert(s) for s in arrays.state)),
        convert(arrays.lr),
        convert(arrays.active),
    )


def _models(count: int, layers: int = 2, units: int = 4, seed: int = 0):
    """Weights, accumulators, a random state, lr and an all-active mask for `count` models."""
    seeds = list(range(seed, seed + count))
    weights = init_weights(ModelConfig(num_layers=layers, state_size=units), seeds, CPU)
    lr = torch.tensor([0.05 + 0.1 * (s % 7) for s in seeds])
    active = torch.ones(count, dtype=torch.bool)
    return weights, init_adagrad(weights), _random_state(layers, units, count), lr, active


def _copy(tensors):
    return [t.clone() for t in tensors]


@pytest.mark.parametrize("layers", [1, 3])
def test_numba_step_update_matches_autograd_and_adagrad(layers):
    weights, accum, state, lr, active = _models(3, layers=layers, units=5, seed=1)
    x, y = _window(3)
    step = _numba_step()
    arrays = WindowArrays(_copy(weights), _copy(accum), State(*_copy(state)), lr, active)
    losses, _, after = step(arrays, x, y)
    updated = after.weights

    reference, expected_weights = _autograd_window(weights, x, y, state, lr)
    # The gates' tanh is a rational approximation within a few ulp: float32 tolerances.
    torch.testing.assert_close(losses, reference, rtol=1e-6, atol=1e-6)
    for new, expected in zip(updated, expected_weights, strict=True):
        torch.testing.assert_close(new, expected, rtol=1e-5, atol=2e-6)


def test_numba_step_follows_the_eager_step_over_the_first_windows():
    numba_run = _models(6, layers=3, units=16)
    eager_run = tuple(State(*_copy(p)) if isinstance(p, State) else p.clone() if
                      isinstance(p, torch.Tensor) else _copy(p) for p in numba_run)  # fmt: skip
    numba_step, eager_step = _numba_step(), step_function(False, CPU)
    assert eager_step.backend == "eager" and not eager_step.compiled
    for window in range(8):
        x, y = _window(6, seed=window)
        results = []
        for step, run in ((numba_step, numba_run), (eager_step, eager_run)):
            losses, margin, after = step(WindowArrays(*run), x, y)
            results.append((losses, margin, after.weights, after.state))
            run_next = tuple(after)
            if step is numba_step:
                numba_run = run_next
            else:
                eager_run = run_next
        (loss_n, margin_n, weights_n, state_n), (loss_e, margin_e, weights_e, state_e) = results
        # Chaotic training amplifies float32 rounding slowly: tight for a few windows.
        torch.testing.assert_close(loss_n, loss_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(margin_n, margin_e, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state_n.h, state_e.h, rtol=1e-4, atol=1e-5)
        for a, b in zip(weights_n, weights_e, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _train_models(seeds: list[int], echo: list[int], lr: list[float], active: list[bool],
                 windows: int = 6, step=None, units: int = 5) -> torch.Tensor:  # fmt: skip
    """Losses (windows, K) of models trained by `step` (numba's by default), each fed its own
    echo data."""
    count = len(seeds)
    weights = init_weights(ModelConfig(num_layers=2, state_size=units), seeds, CPU)
    accum = init_adagrad(weights)
    state = init_state(weights, batch_size=5)
    rates, mask = torch.tensor(lr), torch.tensor(active)
    step = step or _numba_step()
    losses = []
    for window in range(windows):
        x = torch.stack([_window(1, seed=100 * s + window)[0][..., 0] for s in seeds], dim=-1)
        y = torch.stack([torch.roll(x[..., k], e, dims=1) for k, e in enumerate(echo)], dim=-1)
        assert x.shape == (5, 15, count)
        loss, _, after = step(WindowArrays(weights, accum, state, rates, mask), x, y)
        weights, accum, state, _, mask = after
        losses.append(loss.clone())
    return torch.stack(losses)


@pytest.mark.parametrize("count", [1, 5, 16, 37])
def test_numba_step_gives_a_model_the_same_bits_in_any_batch(count):
    # Model (seed 42, echo 3, lr 0.3) alone, then at index k of batches of other models with
    # other seeds, echo steps and rates, some of them inactive.
    alone = _train_models([42], [3], [0.3], [True])[:, 0]
    for k in sorted({0, count // 2, count - 1}):
        seeds = [1000 + i for i in range(count)]
        echo = [1 + i % 9 for i in range(count)]
        lr = [0.05 + 0.07 * (i % 11) for i in range(count)]
        active = [i % 3 != 1 for i in range(count)]
        seeds[k], echo[k], lr[k], active[k] = 42, 3, 0.3, True
        batched = _train_models(seeds, echo, lr, active)
        assert torch.equal(batched[:, k], alone), (count, k)


@pytest.mark.parametrize("units", [4, 20, 32])
def test_eager_step_gives_a_model_the_same_bits_among_any_number_of_others(units, one_thread):
    # Model (seed 42, echo 3, lr 0.3) alone, then among 4 and 18 others of other seeds, echo
    # steps and rates, some of them inactive: on one thread the eager step gives each model
    # the same arithmetic whatever the count of models, which need not fill whole vectors
    # (an elementwise pass over K·75 losses' terms ends mid-vector, and torch's scalar tail
    # rounds sigmoid and softplus otherwise than its vector body). State 20's rows of units
    # end mid-vector too, in numpy's tanh and step products on the CPU.
    step = step_function(False, CPU)
    alone = _train_models([42], [3], [0.3], [True], windows=30, step=step, units=units)[:, 0]
    for count in (5, 19):
        k = count // 2
        seeds = [1000 + i for i in range(count)]
        echo = [1 + i % 9 for i in range(count)]
        lr = [0.05 + 0.07 * (i % 11) for i in range(count)]
        active = [i % 3 != 1 for i in range(count)]
        seeds[k], echo[k], lr[k], active[k] = 42, 3, 0.3, True
        batched = _train_models(seeds, echo, lr, active, windows=30, step=step, units=units)
        assert torch.equal(batched[:, k], alone), count


@pytest.mark.parametrize("chunk_bytes", [None, 3 * 5 * 15 * 4 * 8 * 4])
def test_eager_step_updates_the_lanes_weights_in_place_after_its_first_window(
    chunk_bytes, monkeypatch
):
    # The lanes hold views of the step's model-first storage: a window after the first copies
    # no weight or accumulator (a copy each way per window cost the step a fifth of its time),
    # whether it takes the lanes whole or in chunks (here of 3 models' gate tapes).
    if chunk_bytes is not None:
        from pipeline.training import torch_step

        monkeypatch.setattr(torch_step, "CHUNK_GATE_TAPE_BYTES", chunk_bytes)
    weights, accum, state, lr, active = _models(16, layers=2, units=8)
    step = step_function(False, CPU)
    x, y = _window(16)
    after = step(WindowArrays(weights, accum, state, lr, active), x, y).arrays
    storage = [array.data_ptr() for array in [*after.weights, *after.accum]]
    again = step(after, x, y).arrays
    assert [array.data_ptr() for array in [*again.weights, *again.accum]] == storage


@pytest.mark.parametrize("backend", [True, False])
def test_step_keeps_an_inactive_models_weights_accumulators_and_state(backend):
    weights, accum, state, lr, _ = _models(4, layers=2, units=4)
    active = torch.tensor([True, False, True, False])
    step = _on_tensors(step_function(backend, CPU))
    before = (_copy(weights), _copy(accum), State(*_copy(state)))
    x, y = _window(4)
    _, _, after = step(WindowArrays(weights, accum, state, lr, active), x, y)
    weights, accum, state, _, still = after
    assert still.tolist() == [True, False, True, False]
    for old, new in zip([*before[0], *before[1], *before[2]], [*weights, *accum, *state],
                        strict=True):  # fmt: skip
        assert torch.equal(new[..., 1], old[..., 1]) and torch.equal(new[..., 3], old[..., 3])
    # The active ones moved on.
    assert not torch.equal(state.h[..., 0], before[2].h[..., 0])
    assert not torch.equal(weights[0][..., 2], before[0][0][..., 2])


def test_numba_step_freezes_a_model_whose_loss_is_not_finite():
    weights, accum, state, lr, active = _models(2)
    x, y = _window(2)
    x[0, 0, 1] = float("nan")  # poisons model 1 only
    before = _copy(weights)
    losses, _, after = _numba_step()(WindowArrays(weights, accum, state, lr, active), x, y)
    weights, still = after.weights, after.active
    assert torch.isfinite(losses[0]) and not torch.isfinite(losses[1])
    assert still.tolist() == [True, False]
    for old, new in zip(before, weights, strict=True):
        assert torch.equal(new[..., 1], old[..., 1]) and torch.all(torch.isfinite(new))


def test_numba_tanh_and_sigmoid_are_within_a_few_ulp_of_torch():
    kernels = numba_kernels()
    x = np.concatenate([np.linspace(-12, 12, 4001), 10.0 ** np.linspace(-8, 1, 401)])
    x = np.concatenate([x, -x]).astype(np.float32)
    tanh = np.array([kernels._tanh(v) for v in x], np.float32)
    sigmoid = np.array([kernels._sigmoid(v) for v in x], np.float32)
    exact = np.tanh(x.astype(np.float64)).astype(np.float32)
    ulps = np.abs(tanh.view(np.int32).astype(np.int64) - exact.view(np.int32).astype(np.int64))
    assert ulps.max() <= 4  # same sign throughout, so the int32 views order like the floats
    np.testing.assert_allclose(tanh, torch.tanh(torch.from_numpy(x)).numpy(), rtol=0, atol=3e-7)
    np.testing.assert_allclose(sigmoid, torch.sigmoid(torch.from_numpy(x)).numpy(), atol=3e-7)
    assert np.isnan(kernels._tanh(np.float32("nan")))


def test_step_function_falls_back_to_eager_once_when_numba_is_disabled(tmp_path):
    # NUMBA_DISABLE_JIT is numba's own switch: the kernels refuse to run interpreted, and the
    # step warns once and trains eagerly (a subprocess: numba reads it at import).
    script = (
        "import logging, torch\n"
        "logging.basicConfig()\n"
        "from pipeline.training.device import step_function\n"
        "steps = [step_function('auto', torch.device('cpu')) for _ in range(2)]\n"
        "print([s.backend for s in steps])\n"
    )
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1", "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['eager', 'eager']"
    assert done.stderr.count("numba failed") == 1 and "training without it" in done.stderr


def test_numba_kernels_cache_by_content_not_path(tmp_path):
    # A copy of the package elsewhere (as `ray job submit` makes) loads the kernels that the
    # first process compiled into the cache instead of compiling them again, and knows they
    # are there before importing numba (the driver then skips compiling ahead).
    cache = tmp_path / "cache"
    script = (
        "from pipeline.training import kernel_cache as c; before = c.compiled();"
        "import pipeline.training.kernel_compile as k; k.compile_all();"
        "from pipeline.training.kernels import layer_forward;"
        "print(before, c.compiled(), layer_forward.stats.cache_hits)"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    runs = []
    for name in ("first", "copy"):
        root = tmp_path / name
        shutil.copytree(Path(__file__).parents[2] / "pipeline", root / "pipeline")
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(done.stdout.strip())
    assert runs[0] == "False True Counter()"  # compiled, and marked as such
    assert runs[1].startswith("True True Counter({")  # known to be there, and loaded
    assert len([entry for entry in cache.iterdir() if entry.is_dir()]) == 1  # one content key


@pytest.mark.parametrize(("units", "count"), [(4, 3), (5, 1), (16, 6)])
def test_numba_kernels_by_model_and_by_lane_give_the_same_bits(units, count):
    # The step picks between the two sets of kernels by the window's shape, so a trial that
    # moves between shapes (lanes joining or leaving) must not see the switch. The last model
    # sits out (when there are several): it keeps its weights and state either way.
    from pipeline.training.cpu_step import numba_step

    active = torch.tensor([k < max(1, count - 1) for k in range(count)])
    runs = {}
    for by_model in (True, False):
        weights, accum, state, lr, _ = _models(count, layers=3, units=units)
        step = _on_tensors(numba_step(numba_kernels(), by_model=by_model))
        losses = []
        for window in range(4):
            x, y = _window(count, seed=window)
            loss, _, after = step(WindowArrays(weights, accum, state, lr, active), x, y)
            weights, accum, state = after.weights, after.accum, after.state
            losses.append(loss[active])
        runs[by_model] = [torch.stack(losses), *weights, *accum, *state]
    assert torch.isfinite(runs[True][0]).all()
    for by_model, by_lane in zip(runs[True], runs[False], strict=True):
        assert torch.equal(by_model, by_lane)


def _windows_of_seven(step, active: torch.Tensor) -> list[torch.Tensor]:
    """The losses, margins and active flags of 4 windows of 7 models (3 layers of 8 units) by
    `step`, then the models' weights, accumulators and state after them."""
    weights, accum, state, lr, _ = _models(7, layers=3, units=8)
    results = []
    for window in range(4):
        x, y = _window(7, seed=window)
        loss, margin, after = step(WindowArrays(weights, accum, state, lr, active), x, y)
        weights, accum, state = after.weights, after.accum, after.state
        results += [loss, margin, after.active]
    return [*results, *weights, *accum, *state]


def test_numba_step_gives_models_the_same_bits_in_chunks_as_in_one(monkeypatch):
    # The one-model kernels take a window's lanes in chunks when their tapes would not fit the
    # caches (cpu_step.CHUNK_BYTES); a model's arithmetic, and so every result, is the same
    # whichever chunk it is in. Here 7 lanes in chunks of 1, 2, 2 and 2; 3 models sit out,
    # 2 of them a whole chunk, which runs no kernel.
    from pipeline.training.cpu_step import numba_step

    active = torch.tensor([k not in (1, 3, 4) for k in range(7)])
    family, heads = cpu_step._family(numba_kernels(), by_model=True), []
    counted = family._replace(head=lambda *args: heads.append(1) or family.head(*args))
    monkeypatch.setattr(cpu_step, "_family", lambda kernels, by_model: counted)
    monkeypatch.setattr(cpu_step, "MIN_CHUNK_LANES", 2)
    runs = {}
    for chunk_bytes in (2**40, 1):
        monkeypatch.setattr(cpu_step, "CHUNK_BYTES", chunk_bytes)
        step = _on_tensors(numba_step(numba_kernels(), by_model=True))
        heads.clear()
        runs[chunk_bytes] = _windows_of_seven(step, active), len(heads)
    (whole, whole_heads), (chunked, chunked_heads) = runs.values()
    assert (whole_heads, chunked_heads) == (4, 4 * 3)
    for one, other in zip(whole, chunked, strict=True):
        assert np.array_equal(one.numpy(), other.numpy(), equal_nan=True)


def test_numba_step_runs_models_past_the_chunk_limit_one_at_a_time_with_the_same_bits(
    monkeypatch,
):
    # A model larger than cpu_step.MAX_CHUNKED_MODEL_BYTES (from state 128) runs its window
    # alone, however few the lanes (here 7, under MIN_CHUNK_LANES): the 4 that train take a
    # kernel call each, and give the bits they give all together.
    from pipeline.training.cpu_step import numba_step

    active = torch.tensor([k not in (1, 3, 4) for k in range(7)])
    family, heads = cpu_step._family(numba_kernels(), by_model=True), []
    counted = family._replace(head=lambda *args: heads.append(1) or family.head(*args))
    monkeypatch.setattr(cpu_step, "_family", lambda kernels, by_model: counted)
    runs = []
    for limit in (2**40, 0):  # no model past it; every model past it
        monkeypatch.setattr(cpu_step, "MAX_CHUNKED_MODEL_BYTES", limit)
        step = _on_tensors(numba_step(numba_kernels(), by_model=True))
        heads.clear()
        runs.append((_windows_of_seven(step, active), len(heads)))
    (together, together_heads), (alone, alone_heads) = runs
    assert (together_heads, alone_heads) == (4, 4 * 4)
    for one, other in zip(together, alone, strict=True):
        assert np.array_equal(one.numpy(), other.numpy(), equal_nan=True)


def test_numba_step_runs_windows_in_a_row_chunk_by_chunk_with_the_bits_of_one_a_call(
    monkeypatch,
):
    # numba_windows takes 4 windows in one call, each chunk of lanes through all 4 before the
    # next chunk (its weights stay in the caches): every result is the bits of 4 calls of a
    # window each, here with 7 lanes in chunks of 2, 2 models sitting out and 1 diverging in
    # the middle of the block, which sits out the windows after.
    from pipeline.training.cpu_step import numba_step

    family, heads = cpu_step._family(numba_kernels(), by_model=True), []
    # The head's seventh argument is its chunk's learning rates: the first names the chunk.
    counted = family._replace(
        head=lambda *args: heads.append(float(args[6][0])) or family.head(*args)
    )
    monkeypatch.setattr(cpu_step, "_family", lambda kernels, by_model: counted)
    monkeypatch.setattr(cpu_step, "MIN_CHUNK_LANES", 2)
    monkeypatch.setattr(cpu_step, "CHUNK_BYTES", 1)
    weights, accum, state, lr, _ = _models(7, layers=3, units=8)
    lr[5] = 1e30  # diverges once its weights overflow
    active = torch.tensor([k not in (1, 4) for k in range(7)])
    windows = [_window(7, seed=window) for window in range(4)]

    def arrays():
        return _map(WindowArrays(_copy(weights), _copy(accum), State(*_copy(state)), lr, active),
                    torch.Tensor.numpy)  # fmt: skip

    step = numba_step(numba_kernels(), by_model=True)
    one_a_call, losses = arrays(), []
    for x, y in windows:
        result = step(one_a_call, x.numpy(), y.numpy())
        one_a_call = result.arrays
        losses.append(result.losses)
    window_major, heads[:] = heads[:], []
    xs, ys = (torch.stack(parts).numpy() for parts in zip(*windows, strict=True))
    in_a_row = step.windows(arrays(), xs, ys)

    assert np.isfinite(losses[0][5]) and not np.isfinite(losses[-1][5])
    assert not in_a_row.arrays.active[5] and in_a_row.arrays.active[6]
    # The same kernel calls, chunk by chunk (the chunks' rates ascend) rather than window by
    # window; the diverged model's chunk stops with it.
    assert sorted(heads) == sorted(window_major) and heads != window_major
    assert heads == sorted(heads)
    assert np.array_equal(in_a_row.losses, np.stack(losses), equal_nan=True)
    assert np.array_equal(in_a_row.margin, result.margin, equal_nan=True)
    after = _map(in_a_row.arrays, torch.from_numpy)
    expected = _map(one_a_call, torch.from_numpy)
    for ours, theirs in zip(_flat(after), _flat(expected), strict=True):
        assert np.array_equal(ours.numpy(), theirs.numpy(), equal_nan=True)


def _flat(arrays: WindowArrays) -> list[torch.Tensor]:
    return [*arrays.weights, *arrays.accum, *arrays.state, arrays.active]


def test_eager_step_gives_models_the_same_bits_in_chunks_as_in_one(monkeypatch, one_thread):
    # On the CPU the eager step takes a window's lanes in chunks when their gate tapes pass
    # torch_step.CHUNK_GATE_TAPE_BYTES, each chunk through the whole window; on one
    # thread a model's arithmetic does not depend on its neighbours, so neither do its bits
    # (on two, torch splits elementwise passes where it pleases: a chunk of one model's margins
    # then differed by an ulp). Here 7 lanes, 2 of them sitting out: the 5 that run go in
    # chunks of 1, 2 and 2.
    from pipeline.training import torch_step
    from pipeline.training.torch_backward import Scratch

    active = torch.tensor([k not in (1, 4) for k in range(7)])
    heads = []

    def counted_head(*args):
        heads.append(1)
        return torch_step.EAGER.head_update(*args)

    runs = {}
    for chunk_bytes in (2**40, 2 * 5 * 15 * 4 * 8 * 4):  # whole; two models' gates, state 8
        monkeypatch.setattr(torch_step, "CHUNK_GATE_TAPE_BYTES", chunk_bytes)
        pieces = torch_step.EAGER._replace(
            head_update=counted_head, scratch=Scratch(), chunked=True
        )

        def eager(arrays, x, y, pieces=pieces):
            pieces.scratch.start()
            with torch.no_grad():
                return train_window(arrays, x, y, pieces, running_only=True)

        heads.clear()
        runs[chunk_bytes] = _windows_of_seven(eager, active), len(heads)
    (whole, whole_heads), (chunked, chunked_heads) = runs.values()
    assert (whole_heads, chunked_heads) == (4, 4 * 3)
    for one, other in zip(whole, chunked, strict=True):
        assert torch.equal(one.nan_to_num(7.0), other.nan_to_num(7.0))


def test_numba_step_never_reads_what_its_kept_tapes_held_before():
    # A step keeps its tapes from one window to the next of the same shape (fresh ones
    # page-faulted), so the kernels must write every entry of a tape before reading it: kept
    # tapes filled with NaN between windows change no bit of what the windows give.
    from pipeline.training.cpu_step import numba_window
    from pipeline.training.tapes import Tapes

    kernels = numba_kernels()
    for by_model in (True, False):
        runs = []
        for poisoned in (False, True):
            weights, accum, state, lr, active = _models(6, layers=3, units=8)
            weights, accum = [w.numpy() for w in weights], [a.numpy() for a in accum]
            state, tapes, losses = State(state.h.numpy(), state.c.numpy()), Tapes(), []
            for window in range(3):
                for kept in tapes.kept if poisoned else ():
                    kept.fill(np.nan)
                x, y = (t.numpy() for t in _window(6, seed=window))
                arrays = WindowArrays(weights, accum, state, lr.numpy(), active.numpy())
                loss, _, after = numba_window(kernels, arrays, x, y, by_model=by_model, tapes=tapes)
                weights, accum, state = after.weights, after.accum, after.state
                losses.append(loss.copy())
                if window == 0:
                    first_tapes = list(tapes.kept)
            # The same tapes served every window: those the NaN went into were read again.
            assert len(first_tapes) >= 10
            assert [id(t) for t in tapes.kept] == [id(t) for t in first_tapes]
            runs.append([np.stack(losses), *weights, *state])
        assert np.isfinite(runs[1][0]).all()
        for clean, poisoned in zip(*runs, strict=True):
            assert np.array_equal(clean, poisoned)


def test_windows_run_on_the_family_that_is_ready_with_the_same_bits(tmp_path):
    # On a cold machine a trainer trains on whichever family of kernels is ready while another
    # process compiles the faster one. Held here, the lock of the family that one model of
    # state 16 prefers (one model at a time) makes the run train on the other; its losses must
    # be the bits it gets on the preferred family.
    script = """
import json
from pipeline.training import kernel_compile
from pipeline.config import config_from_dict
from pipeline.training.train import train
config = config_from_dict({
    "task": {"series_length": 600, "echo_step": 3, "batch_size": 5, "truncation": 15},
    "model": {"num_layers": 2, "state_size": 16},
    "train": {"epochs": 2, "lr": 0.3, "seed": 5, "device": "cpu"},
})
losses = train([config]).runs[0].losses
print(json.dumps({"loaded": sorted(kernel_compile._loaded), "losses": losses.tolist()}))
"""
    cache = copy_of_the_kernel_cache(tmp_path / "cache")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}

    def run() -> dict:
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    with open(cache / "compile-by_model.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a process compiling it would
        meanwhile = run()
        fcntl.flock(lock, fcntl.LOCK_UN)
    preferred = run()
    assert meanwhile["loaded"] == ["by_lane"]
    assert "by_model" in preferred["loaded"]
    assert len(preferred["losses"]) == 16
    assert meanwhile["losses"] == preferred["losses"]


def test_windows_switch_to_the_preferred_family_once_it_is_ready(tmp_path):
    # A trainer that started on the family that was ready (another process compiling the one
    # its model prefers) takes up the preferred one at the first window after that process
    # lets it go. The child steps one model of state 16 (it prefers one model at a time) a
    # window per line it reads, and prints the family each window ran on (a private hook,
    # cpu_step._run_window: this test fails if it is renamed); it looks for a
    # missing family before every window (LOOK_AGAIN_S 0), so the switch has one window to
    # happen in.
    script = """
import sys
from pipeline.config import config_from_dict
from pipeline.training import cpu_step, kernel_compile
from pipeline.training.device import window_step
from pipeline.training.lanes import Lanes
from pipeline.training.trial import LaneTrial
kernel_compile.LOOK_AGAIN_S = 0.0
chosen = []
run_window = cpu_step._run_window
def noted(kernels, way, *args):
    chosen.append(way)
    return run_window(kernels, way, *args)
cpu_step._run_window = noted
config = config_from_dict({
    "task": {"series_length": 600, "echo_step": 3, "batch_size": 5, "truncation": 15},
    "model": {"num_layers": 2, "state_size": 16},
    "train": {"epochs": 2, "lr": 0.3, "seed": 5, "device": "cpu"},
})
step, device = window_step(config, threads=1, gpu_from_ray=False)
lanes = Lanes(config, step, device)
lanes.admit(LaneTrial(0, config))
for _ in sys.stdin:
    lanes.step()
    print(chosen[-1], flush=True)
"""
    cache = copy_of_the_kernel_cache(tmp_path / "cache")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip

    def window() -> str:
        child.stdin.write("\n")
        child.stdin.flush()
        return child.stdout.readline().strip()

    try:
        with open(cache / "compile-by_model.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # as a process compiling it would
            meanwhile = [window(), window()]
            fcntl.flock(lock, fcntl.LOCK_UN)
        once_ready = [window() for _ in range(2 + cpu_step.TIMED_WINDOWS)]
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    # While the preferred family is being compiled elsewhere the windows run on the other...
    assert meanwhile == ["by_lane", "by_lane"]
    # ...and from the first window after it is ready, on the preferred one, raced from then
    # on against the other (cpu_step.Race: each family's windows in a row) to keep the faster.
    assert once_ready == ["by_model"] * (1 + cpu_step.TIMED_WINDOWS) + ["by_lane"]


def test_a_trainer_that_loads_only_cached_kernels_trains_on_those(tmp_path):
    # With Ray embedded, the driver compiles ahead only the families a study wants; its
    # trainers take up those and never compile another mid-study (here the vectorized kernels,
    # which eight models of state 4 would prefer). The trainer starts while the compile-ahead
    # still holds its lock (held here), and takes up the family once the lock is let go, even
    # before it would look for it again.
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    script = """
import json
from pipeline.training import kernel_compile
from pipeline.config import config_from_dict
from pipeline.training.train import train
kernel_compile.load_only_cached()
kernel_compile.LOOK_AGAIN_S = 600.0
configs = [config_from_dict({
    "task": {"series_length": 300, "echo_step": 3, "batch_size": 5, "truncation": 15},
    "model": {"num_layers": 1, "state_size": 4},
    "train": {"epochs": 1, "lr": 0.3, "seed": seed, "device": "cpu"},
}) for seed in range(8)]
result = train(configs)
steps = [r.steps for r in result.runs]
print(json.dumps({"loaded": sorted(kernel_compile._loaded), "steps": steps}))
"""
    compile_ahead = "import pipeline.training.kernel_compile as k; k.compile_all(('by_model',))"
    done = subprocess.run(
        [sys.executable, "-c", compile_ahead], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "cache" / "compile-by_model.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        trainer = subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
        )
        # Let go only once the trainer waits on the lock: the path this test is about.
        _wait_until_blocked_on_a_lock(trainer.pid)
        fcntl.flock(lock, fcntl.LOCK_UN)
    out, _ = trainer.communicate(timeout=300)
    assert trainer.returncode == 0
    ran = json.loads(out.strip().splitlines()[-1])
    assert ran == {"loaded": ["by_model"], "steps": [4] * 8}
    assert not list((tmp_path / "cache").glob("kernels-*/compiled-by_lane-*"))


def _wait_until_blocked_on_a_lock(pid: int, timeout: float = 120) -> None:
    """Wait until process `pid` waits for a file lock (a "->" line of /proc/locks)."""
    deadline = time.monotonic() + timeout
    while True:
        waiters = [line.split() for line in Path("/proc/locks").read_text().splitlines()]
        if any(fields[1] == "->" and fields[5] == str(pid) for fields in waiters):
            return
        assert time.monotonic() < deadline, f"process {pid} never waited for a lock"
        time.sleep(0.05)
