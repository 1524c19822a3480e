"""Our trainer against the tutorial's own TensorFlow code, run side by side.

Two checks (`python bench/tutorial_tf.py [--seeds N] [--epochs E]`):

1. Same weights and data. Our seed-0 initial weights (kernel blocks reordered from our
   i, f, o, g to TensorFlow's i, j, f, o, and the forget bias moved to TF's constant
   forget_bias = 1.0) and our seed-0 data are fed to the tutorial's graph under
   `tf.compat.v1`; it prints the largest window-by-window loss difference over the first 100
   windows, and the step at which each reaches a 100-step mean below 0.01.
2. Seeds. Over N seeds, each framework with its own initialization and data (ours from our
   seeds, TF's from `np.random.seed` and `tf.compat.v1.set_random_seed`, as the tutorial
   draws them), it prints both distributions of steps to converge and a Mann–Whitney test.

TensorFlow is not a project dependency: its part runs in its own virtual environment, made on
first use under ~/.cache/echo-study/tf-venv (tensorflow-cpu, tf-keras 2.21.0, with
TF_USE_LEGACY_KERAS=1 so that the tutorial's `tf.nn.rnn_cell` cells exist), as a child process
of this script, which exchanges arrays with it through .npz files.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TF_VENV = Path.home() / ".cache" / "echo-study" / "tf-venv"
TF_PACKAGES = ["tensorflow-cpu", "tf-keras==2.21.0"]
THRESHOLD, WINDOW = 0.01, 100
MATCH_WINDOWS = 100

# The tutorial's graph, as in the seed file, under tf.compat.v1. It runs in the TF venv: it
# reads a job (.npz) and writes the losses of every window it trained (.npz).
TF_PROGRAM = r"""
import sys
import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1
tf1.disable_eager_execution()
tf.get_logger().setLevel("ERROR")
job = dict(np.load(sys.argv[1], allow_pickle=True))
num_layers, state_size, batch_size, truncation = (int(job[k]) for k in
    ("num_layers", "state_size", "batch_size", "truncation"))
series_length, echo_step = int(job["series_length"]), int(job["echo_step"])
epochs = int(job["epochs"])
num_batches = series_length // batch_size // truncation
threshold, window = float(job["threshold"]), int(job["window"])


def generate_data():
    x = np.array(np.random.choice(2, series_length, p=[0.5, 0.5]))
    y = np.roll(x, echo_step)
    y[0:echo_step] = 0
    return x.reshape((batch_size, -1)), y.reshape((batch_size, -1))


def run(seed, weights, data, max_windows, stop_when_converged):
    tf1.reset_default_graph()
    tf1.set_random_seed(seed)
    np.random.seed(seed)
    batchX_placeholder = tf1.placeholder(tf.float32, [batch_size, truncation])
    batchY_placeholder = tf1.placeholder(tf.int32, [batch_size, truncation])
    init_state = tf1.placeholder(tf.float32, [num_layers, 2, batch_size, state_size])
    state_per_layer_list = tf.unstack(init_state, axis=0)
    rnn_tuple_state = tuple(
        tf1.nn.rnn_cell.LSTMStateTuple(state_per_layer_list[i][0], state_per_layer_list[i][1])
        for i in range(num_layers))
    W2 = tf.Variable(np.random.rand(state_size, 2), dtype=tf.float32)
    b2 = tf.Variable(np.zeros((1, 2)), dtype=tf.float32)
    inputs_series = tf.split(batchX_placeholder, truncation, 1)
    labels_series = tf.unstack(batchY_placeholder, axis=1)
    cells = [tf1.nn.rnn_cell.LSTMCell(state_size, state_is_tuple=True) for _ in range(num_layers)]
    cell = tf1.nn.rnn_cell.MultiRNNCell(cells, state_is_tuple=True)
    states_series, current_state = tf1.nn.static_rnn(
        cell, inputs_series, initial_state=rnn_tuple_state)
    logits_series = [tf.matmul(state, W2) + b2 for state in states_series]
    losses = [tf.nn.sparse_softmax_cross_entropy_with_logits(logits=l, labels=y)
              for l, y in zip(logits_series, labels_series)]
    total_loss = tf.reduce_mean(losses)
    train_step = tf1.train.AdagradOptimizer(0.3).minimize(total_loss)
    loss_list = []
    with tf1.Session() as sess:
        sess.run(tf1.global_variables_initializer())
        if weights is not None:
            W2.load(weights["w_out"], sess)
            b2.load(weights["b_out"][None, :], sess)
            for layer, c in enumerate(cells):
                c.variables[0].load(weights[f"kernel_{layer}"], sess)
                c.variables[1].load(weights[f"bias_{layer}"], sess)
        for epoch in range(epochs):
            x, y = data[epoch] if data is not None else generate_data()
            state = np.zeros((num_layers, 2, batch_size, state_size))
            for batch in range(num_batches):
                start = batch * truncation
                loss, _, state = sess.run([total_loss, train_step, current_state], feed_dict={
                    batchX_placeholder: x[:, start:start + truncation],
                    batchY_placeholder: y[:, start:start + truncation],
                    init_state: state})
                loss_list.append(loss)
                if len(loss_list) >= max_windows:
                    return np.array(loss_list, np.float32)
                if (stop_when_converged and len(loss_list) >= window
                        and np.mean(loss_list[-window:]) < threshold):
                    return np.array(loss_list, np.float32)
    return np.array(loss_list, np.float32)


results = {}
if "kernel_0" in job:
    weights = {k: job[k] for k in job
               if k.startswith(("kernel_", "bias_")) or k in ("w_out", "b_out")}
    data = [(job[f"x_{e}"], job[f"y_{e}"]) for e in range(epochs)]
    results["matched"] = run(0, weights, data, int(job["max_windows"]), True)
for seed in range(int(job["seeds"])):
    results[f"seed_{seed}"] = run(seed, None, None, 10**9, True)
np.savez(sys.argv[2], **results)
"""


def ensure_tf_venv() -> Path:
    """The TF venv's python, made (a minute or two, once) if it is missing."""
    python = TF_VENV / "bin" / "python"
    if not python.exists():
        print(f"Creating {TF_VENV} with {', '.join(TF_PACKAGES)} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TF_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TF_PACKAGES], check=True)
    return python


def tf_layout(weights: list) -> dict[str, np.ndarray]:
    """Our initial weights of one model as the tutorial's TF variables: each layer's kernel is
    [w_input; w_hidden] with gate blocks reordered from i, f, o, g to TF's i, j (= g), f, o, and
    its bias without the forget gate's 1.0, which TF's LSTMCell adds as forget_bias."""
    arrays = [w[..., 0].numpy() for w in weights]
    layers = (len(arrays) - 2) // 3
    units = arrays[1].shape[0]
    i, f, o, g = (slice(k * units, (k + 1) * units) for k in range(4))
    order = np.r_[i, g, f, o]
    out = {"w_out": arrays[-2], "b_out": arrays[-1]}
    for layer in range(layers):
        w_input, w_hidden, bias = arrays[3 * layer : 3 * layer + 3]
        out[f"kernel_{layer}"] = np.concatenate([w_input, w_hidden])[:, order]
        tf_bias = bias.copy()
        tf_bias[f] -= 1.0
        out[f"bias_{layer}"] = tf_bias[order]
    return out


def steps_to_converge(losses: np.ndarray) -> int | None:
    """First step whose trailing 100-step mean is below 0.01 (the pipeline's definition)."""
    from pipeline.results.metrics import steps_to_converge as ours

    return ours(losses, THRESHOLD, WINDOW)


def mann_whitney(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sided Mann–Whitney U test, normal approximation with the tie correction:
    (U of `a`, p)."""
    values = np.concatenate([a, b])
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    # Midranks for ties.
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    midranks = first + (counts + 1) / 2
    ranks[order] = np.repeat(midranks, counts)
    n, m = len(a), len(b)
    u = ranks[:n].sum() - n * (n + 1) / 2
    total = n + m
    tie = (counts**3 - counts).sum() / (total * (total - 1))
    sigma = math.sqrt(n * m / 12 * ((total + 1) - tie))
    z = (abs(u - n * m / 2) - 0.5) / sigma if sigma else 0.0
    return u, math.erfc(max(z, 0.0) / math.sqrt(2))


def describe(name: str, steps: list[int | None], horizon: int) -> str:
    reached = np.array([s for s in steps if s is not None], float)
    text = f"{name:<12} converged {len(reached)}/{len(steps)}"
    if len(reached):
        q25, q50, q75 = np.quantile(reached, [0.25, 0.5, 0.75])
        text += (
            f", steps to converge median {q50:.0f} (quartiles {q25:.0f}–{q75:.0f}, "
            f"range {reached.min():.0f}–{reached.max():.0f})"
        )
    if len(reached) < len(steps):
        text += f"; the rest not within {horizon} steps"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=64, help="seeds per framework (64)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per run (the tutorial's 5)")
    args = parser.parse_args()

    import torch

    from pipeline.config import config_from_dict
    from pipeline.training.data import echo_series
    from pipeline.training.torch_step import init_weights
    from pipeline.training.train import train

    torch.set_num_threads(1)
    raw = {
        "task": {"series_length": 50000, "echo_step": 3, "batch_size": 5, "truncation": 15},
        "model": {"num_layers": 3, "state_size": 4},
        "train": {"epochs": args.epochs, "lr": 0.3, "seed": 0, "compile": False, "device": "cpu"},
    }
    config = config_from_dict(raw)
    task, model = config.task, config.model
    python = ensure_tf_venv()

    job = {
        **{k: getattr(task, k) for k in ("series_length", "echo_step", "batch_size", "truncation")},
        "num_layers": model.num_layers,
        "state_size": model.state_size,
        "epochs": args.epochs,
        "threshold": THRESHOLD,
        "window": WINDOW,
        "seeds": args.seeds,
        "max_windows": config.total_steps,
        **tf_layout(init_weights(model, [0], torch.device("cpu"))),
    }
    for epoch in range(args.epochs):
        job[f"x_{epoch}"], job[f"y_{epoch}"] = echo_series(task, 0, epoch)

    started = time.perf_counter()
    ours = train([config.with_params({"train.seed": seed}) for seed in range(args.seeds)])
    ours_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        np.savez(f"{folder}/job.npz", **job)
        environment = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        started = time.perf_counter()
        subprocess.run(
            [str(python), "-c", TF_PROGRAM, f"{folder}/job.npz", f"{folder}/out.npz"],
            check=True,
            env=environment,
        )
        tf_seconds = time.perf_counter() - started
        tf_out = dict(np.load(f"{folder}/out.npz"))

    horizon = config.total_steps
    ours_seed0 = ours.runs[0].losses
    matched = tf_out["matched"]
    difference = np.abs(ours_seed0[:MATCH_WINDOWS] - matched[:MATCH_WINDOWS])
    print("## Same weights and data (seed 0, tutorial config: 3 layers × 4 units, echo 3)")
    print(
        f"largest window-by-window loss difference over the first {MATCH_WINDOWS} windows: "
        f"{difference.max():.2e} (window {difference.argmax()}; losses there "
        f"{ours_seed0[difference.argmax()]:.7f} ours, {matched[difference.argmax()]:.7f} TF)"
    )
    print(
        f"steps to converge (100-step mean < {THRESHOLD}): ours {steps_to_converge(ours_seed0)}, "
        f"TF {steps_to_converge(matched)}"
    )
    print(
        f"\n## {args.seeds} seeds, each framework with its own initialization and data "
        f"({args.epochs} epochs, {horizon} steps)"
    )
    ours_steps = [steps_to_converge(run.losses) for run in ours.runs]
    tf_steps = [steps_to_converge(tf_out[f"seed_{seed}"]) for seed in range(args.seeds)]
    print(describe("ours", ours_steps, horizon))
    print(describe("TF tutorial", tf_steps, horizon))
    # A run that never converged ranks after every one that did.
    never = float(horizon)
    u, p = mann_whitney(
        np.array([never if s is None else s for s in ours_steps], float),
        np.array([never if s is None else s for s in tf_steps], float),
    )
    print(f"Mann–Whitney U = {u:.0f}, two-sided p = {p:.2f} (normal approximation)")
    print(
        f"\n(ours: {ours_seconds:.0f} s for {args.seeds} seeds in lockstep; TF: {tf_seconds:.0f} s)"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
