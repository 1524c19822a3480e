import math

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model import (
    ADAGRAD_INITIAL_ACCUMULATOR,
    FORGET_BIAS,
    State,
    forward,
    init_adagrad,
    init_state,
    init_weights,
    train_window,
)

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
    losses, _, updated, _, _, _ = train_window(weights, accum, x, y, state, lr, active)

    # The reference: autograd through the same forward, the initial state a constant, then
    # TensorFlow's Adagrad by hand.
    leaves = [w.clone().requires_grad_(True) for w in weights]
    logits, _ = forward(leaves, x, state)
    log_p = torch.log_softmax(logits, dim=2)
    reference = -(log_p[:, :, 1] * y + log_p[:, :, 0] * (1 - y)).mean(dim=(0, 1))
    grads = torch.autograd.grad(reference.sum(), leaves)
    torch.testing.assert_close(losses, reference.detach(), rtol=1e-6, atol=1e-7)
    for w, g, new in zip(weights, grads, updated, strict=True):
        expected = w - lr * g / torch.sqrt(ADAGRAD_INITIAL_ACCUMULATOR + g * g)
        torch.testing.assert_close(new, expected, rtol=1e-5, atol=1e-6)


def test_train_window_carries_a_state_without_a_graph_that_changes_the_next_loss():
    weights = init_weights(ModelConfig(), [0], CPU)
    accum = init_adagrad(weights)
    x, y = _window(1)
    active = torch.ones(1, dtype=torch.bool)
    lr = torch.tensor([0.3])
    zeros = init_state(weights, batch_size=5)
    _, _, weights, accum, carried, _ = train_window(weights, accum, x, y, zeros, lr, active)
    # The state reaches the next window: it is not zero, and it holds no autograd graph.
    assert carried.h.abs().sum() > 0 and carried.c.abs().sum() > 0
    assert carried.h.grad_fn is None and not carried.h.requires_grad
    x2, y2 = _window(1, seed=1)
    with_carry = train_window(weights, accum, x2, y2, carried, lr, active)[0]
    without = train_window(weights, accum, x2, y2, zeros, lr, active)[0]
    assert not torch.equal(with_carry, without)


def test_train_window_freezes_a_model_whose_loss_is_not_finite():
    weights = init_weights(ModelConfig(), [0, 1], CPU)
    accum = init_adagrad(weights)
    x, y = _window(2)
    x[0, 0, 1] = float("nan")  # poisons model 1 only
    state = init_state(weights, batch_size=5)
    active = torch.ones(2, dtype=torch.bool)
    losses, _, updated, _, _, still_active = train_window(
        weights, accum, x, y, state, torch.tensor([0.3, 0.3]), active
    )
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
