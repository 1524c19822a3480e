import numpy as np
import pytest

from pipeline.config import config_from_dict
from pipeline.results.metrics import steps_to_converge
from pipeline.training.train import Step, train
from pipeline.training.trial import lanes_key
from tests.conftest import small_config


def _eight_different_models():
    """Eight models of one architecture, each with its own seed, echo step and learning rate."""
    echo_steps = [1, 2, 3, 5, 3, 8, 15, 4]
    rates = [0.3, 0.1, 0.5, 0.3, 0.05, 0.3, 0.2, 1.0]
    return [
        small_config(**{"train.seed": 10 + k, "task.echo_step": e, "train.lr": lr})
        for k, (e, lr) in enumerate(zip(echo_steps, rates, strict=True))
    ]


def test_train_model_in_a_batch_of_eight_follows_its_trace_alone():
    configs = _eight_different_models()
    batched = train(configs)
    for k, config in enumerate(configs):
        alone = train([config]).runs[0].losses
        trace = batched.runs[k].losses
        assert len(trace) == len(alone) == config.total_steps
        # Its whole trace (40 windows, two epochs), to float32 rounding: the kernels may sum in
        # another order for other batch widths, but never use another model's data or weights.
        np.testing.assert_allclose(trace, alone, rtol=1e-5, atol=1e-6)


def test_train_same_config_gives_the_same_losses_twice():
    config = small_config(**{"train.seed": 3})
    first, second = train([config]), train([config])
    assert np.array_equal(first.runs[0].losses, second.runs[0].losses)
    other = train([small_config(**{"train.seed": 4})])
    assert not np.array_equal(first.runs[0].losses, other.runs[0].losses)


def test_train_without_carried_state_gives_other_losses():
    carried = train([small_config()]).runs[0].losses
    reset = train([small_config(**{"train.carry_state": False})]).runs[0].losses
    # The first window of each epoch starts from zeros either way; the second one differs.
    assert carried[0] == reset[0]
    assert carried[1] != reset[1]


def test_train_calls_back_after_every_window_with_every_models_loss():
    configs = [small_config(**{"train.seed": s}) for s in (1, 2)]
    seen: list[tuple[int, int, int, np.ndarray]] = []

    def record(step: Step) -> None:
        seen.append((step.step, step.epoch, step.window, step.losses.copy()))
        # What the callback sees is its own copy: scribbling on it changes nothing recorded.
        step.losses[:] = -1.0

    result = train(configs, on_step=record)
    windows = configs[0].task.windows_per_epoch
    assert [s[0] for s in seen] == list(range(2 * windows))
    assert seen[windows + 1][1:3] == (1, 1)
    reported = np.stack([s[3] for s in seen], axis=1)
    # The callback ran after the window's losses were written: each is a real, finite loss.
    assert np.isfinite(reported).all() and (reported > 0).all()
    assert np.array_equal(reported, np.stack([r.losses for r in result.runs]))


def test_train_stops_a_pruned_model_while_its_batch_goes_on():
    configs = [small_config(**{"train.seed": s}) for s in (1, 2)]

    def prune_first_at_step_5(step: Step) -> list[int]:
        return [0] if step.step >= 5 else []

    result = train(configs, on_step=prune_first_at_step_5)
    assert result.runs[0].status == "pruned" and result.runs[0].steps == 6
    assert result.runs[1].status == "complete" and result.runs[1].steps == configs[1].total_steps
    # The pruned model's partner ran the very same computation as without the pruning.
    unpruned = train(configs).runs
    assert np.array_equal(result.runs[1].losses, unpruned[1].losses)
    assert np.array_equal(result.runs[0].losses, unpruned[0].losses[:6])


def test_train_records_a_diverged_model_and_keeps_its_batch_going():
    # Adagrad steps by about lr, so the output weights overflow float32 at once.
    configs = [small_config(), small_config(**{"train.lr": 1e38, "train.seed": 5})]
    result = train(configs)
    healthy, diverged = result.runs
    assert diverged.status == "diverged"
    assert not np.isfinite(diverged.losses[-1]) and np.isfinite(diverged.losses[:-1]).all()
    assert diverged.steps < configs[1].total_steps
    assert healthy.status == "complete" and np.isfinite(healthy.losses).all()


def test_train_refuses_models_of_different_architectures():
    with pytest.raises(ValueError, match="differ"):
        train([small_config(), small_config(**{"model.state_size": 8})])
    assert lanes_key(small_config(**{"task.echo_step": 9, "train.lr": 0.1})) == lanes_key(
        small_config()
    )


def test_train_tutorial_config_learns_within_two_epochs_on_several_seeds():
    # The numba kernels, as a user's CPU run trains (the torch step follows them to float32
    # rounding: test_train_torch_step_follows_the_numba_step_within_float32_rounding_...).
    base = config_from_dict({"train": {"epochs": 2, "compile": True, "device": "cpu"}})
    seeds = [0, 1, 2, 3]
    result = train([base.with_params({"train.seed": s}) for s in seeds])
    for seed, run in zip(seeds, result.runs, strict=True):
        # About ln 2 at first, as in the tutorial's printout...
        assert 0.66 < run.losses[0] < 0.73, seed
        # ...and the 100-step mean below 0.01 within the first two epochs (1,332 windows).
        reached = steps_to_converge(run.losses, threshold=0.01, window=100)
        assert reached is not None and reached < 2 * 666, (seed, reached)


def test_train_cannot_learn_an_echo_at_or_beyond_the_truncation():
    # No gradient links an input to a target 15 or more steps later: the loss stays near ln 2.
    base = config_from_dict({"train": {"epochs": 2, "compile": True, "device": "cpu"}})
    configs = [
        base.with_params({"train.seed": s, "task.echo_step": e})
        for s, e in [(0, 15), (1, 15), (2, 20)]
    ]
    for run in train(configs).runs:
        averages = np.convolve(run.losses, np.full(100, 0.01), "valid")
        assert averages.min() > 0.6


def test_train_compiled_model_computes_the_same_losses_alone_or_batched():
    # One compiled kernel serves every batch width, each model owns its lane and every lane
    # runs in a full vector, so a model's losses are bit-identical alone or among others.
    configs = [
        small_config(**{"model.num_layers": 1, "train.compile": True, "train.seed": s,
                        "task.echo_step": e, "train.lr": lr})
        for s, e, lr in [(1, 1, 0.3), (2, 3, 0.1), (3, 15, 1.0)]
    ]  # fmt: skip
    batched = train(configs)
    assert batched.compiled
    for k, config in enumerate(configs):
        alone = train([config])
        assert np.array_equal(alone.runs[0].losses, batched.runs[k].losses)
    assert all(
        np.array_equal(a.losses, b.losses)
        for a, b in zip(train(configs[:2]).runs, batched.runs[:2], strict=False)
    )
    # The compiled kernels compute what the eager ones do, to float32 rounding at first.
    eager = train([configs[0].with_params({"train.compile": False})]).runs[0].losses
    np.testing.assert_allclose(batched.runs[0].losses[:10], eager[:10], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("units", [16, 32])
def test_train_torch_step_follows_the_numba_step_within_float32_rounding_for_100_windows(units):
    # The torch step (batched matmuls over the models, model first) and the numba kernels
    # (model last) round differently, but float32 rounding grows slowly: 3 layers, four
    # trials of other seeds and echo steps, 100 windows (5 epochs of 20).
    configs = [
        small_config(**{"model.num_layers": 3, "model.state_size": units, "train.seed": s,
                        "task.echo_step": 1 + s, "train.epochs": 5})
        for s in range(4)
    ]  # fmt: skip
    torch_run = train(configs)
    numba_run = train([c.with_params({"train.compile": True}) for c in configs])
    assert not torch_run.compiled and numba_run.compiled
    torch_losses = np.stack([run.losses for run in torch_run.runs])
    numba_losses = np.stack([run.losses for run in numba_run.runs])
    assert torch_losses.shape == (4, 100)
    # Measured: at most 7.6e-7 apart relative (5 to 8 float32 ulp) over the 100 windows.
    np.testing.assert_allclose(torch_losses, numba_losses, rtol=2e-6, atol=0)


def test_train_torch_step_gives_a_model_the_same_bits_alone_or_among_others_on_one_thread(
    one_thread,
):
    # What the batched matmuls give on the CPU at one thread (MKL's batched GEMM computes each
    # model's product alone), with the eager step running the trials that train and no
    # others: a trial's losses are the same bits alone (1 model of 16 lanes) or among 19
    # trials of other seeds and echo steps (20 of 32). Not promised on a GPU, where cuBLAS
    # may pick another kernel for another batch count, nor on several threads.
    configs = [
        small_config(**{"model.state_size": 32, "train.seed": s, "task.echo_step": 1 + s % 5})
        for s in range(20)
    ]
    alone = train(configs[3:4]).runs[0].losses
    assert np.array_equal(train(configs).runs[3].losses, alone)
