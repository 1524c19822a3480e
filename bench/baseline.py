"""The straightforward per-trial loop that the benchmarks measure our pipeline against.

This is the loop a typical PyTorch user writes for the tutorial, one trial at a time:
`nn.LSTM(1, H, num_layers, batch_first=True)` and `nn.Linear(H, 2)`, Adagrad at the trial's
learning rate, the (h, c) state carried from window to window and detached at the top of each,
cross-entropy averaged over the window, and every window's loss kept with `.item()` as the
tutorial keeps its `loss_list`. The task is ours: a random binary series per epoch, its echo as
the target, both cut into `batch_size` contiguous rows and walked in windows of `truncation`
columns, the state reset to zeros at each epoch. It imports nothing from the pipeline, so that
it stays the plain loop; the only concession to our model is Adagrad's initial accumulator of
0.1 (TensorFlow's), which costs nothing.

Run as a script, it is the whole study a newcomer would write: a grid of trials in a
`multiprocessing.Pool` of one-thread processes, each trial writing its losses to its own Parquet
file (`bench/first_run.py` times it against the pipeline):

    python bench/baseline.py GRID.json --processes 2 --output DIR

GRID.json: {"fixed": {TrialSpec field: value}, "axes": {TrialSpec field: [values]}}; the trials
are every combination of the axes. DIR/steps/trial-NNNNNN.parquet then holds each trial's
`trial, epoch, window, step, loss` and its parameters, as the pipeline's steps/ does.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Barrier
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

ADAGRAD_INITIAL_ACCUMULATOR = 0.1
# A process that takes longer than this to start (import torch) has failed to.
READY_TIMEOUT_S = 300


@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial of the loop needs; the fields mirror the pipeline's dotted keys."""

    num_layers: int
    state_size: int
    echo_step: int
    lr: float
    epochs: int
    series_length: int
    batch_size: int
    truncation: int
    seed: int

    @property
    def windows_per_epoch(self) -> int:
        return self.series_length // self.batch_size // self.truncation

    @property
    def windows(self) -> int:
        """Windows (optimizer steps) of the whole trial."""
        return self.epochs * self.windows_per_epoch


@dataclass(frozen=True)
class BaselineResult:
    """The loss of every window, and the seconds the training loop took (data included)."""

    losses: np.ndarray
    seconds: float


class EchoLSTM(nn.Module):
    """Stacked LSTM over one scalar per step, then a linear layer to 2 classes."""

    def __init__(self, num_layers: int, state_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, state_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(state_size, 2)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        outputs, state = self.lstm(x, state)  # (B, T, H)
        return self.head(outputs), state  # (B, T, 2)


def init_worker(ready: Barrier | None = None) -> None:
    """Pool initializer: one thread per process, so that N processes use N cores; then wait at
    `ready`, so that the parent starts its clock once every process is up."""
    torch.set_num_threads(1)
    if ready is not None:
        ready.wait(timeout=READY_TIMEOUT_S)


def generate_data(
    spec: TrialSpec, rng: np.random.Generator, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of the echo task: inputs (B, columns, 1) float and targets (B, columns) long,
    on `device`."""
    x = rng.integers(0, 2, spec.series_length)
    y = np.roll(x, spec.echo_step)
    y[: spec.echo_step] = 0
    rows = (spec.batch_size, -1)
    return (
        torch.from_numpy(x.reshape(rows)).float().unsqueeze(-1).to(device),
        torch.from_numpy(y.reshape(rows)).long().to(device),
    )


def train_trial(spec: TrialSpec, device: str = "cpu") -> BaselineResult:
    """Train one trial with the plain loop on `device` (cuda: the model, its state and each
    epoch's data there, cuDNN's LSTM) and return its per-window losses."""
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    model = EchoLSTM(spec.num_layers, spec.state_size).to(device)
    optimizer = torch.optim.Adagrad(
        model.parameters(), lr=spec.lr, initial_accumulator_value=ADAGRAD_INITIAL_ACCUMULATOR
    )
    zeros = torch.zeros(spec.num_layers, spec.batch_size, spec.state_size, device=device)
    losses = []
    started = time.perf_counter()
    for _ in range(spec.epochs):
        x, y = generate_data(spec, rng, device)
        state = (zeros, zeros)
        for window in range(spec.windows_per_epoch):
            columns = slice(window * spec.truncation, (window + 1) * spec.truncation)
            # Cut the graph at the window boundary: truncated BPTT.
            state = tuple(s.detach() for s in state)
            logits, state = model(x[:, columns], state)
            loss = F.cross_entropy(logits.reshape(-1, 2), y[:, columns].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    seconds = time.perf_counter() - started
    return BaselineResult(np.asarray(losses, dtype=np.float32), seconds)


def grid_specs(grid: Mapping[str, Any]) -> list[TrialSpec]:
    """Every combination of `grid["axes"]` (field → values), the other fields from
    `grid["fixed"]`, in the order of itertools.product."""
    axes = grid["axes"]
    return [
        TrialSpec(**grid["fixed"], **dict(zip(axes, values, strict=True)))
        for values in itertools.product(*axes.values())
    ]


def steps_frame(number: int, spec: TrialSpec, losses: np.ndarray) -> pd.DataFrame:
    """A trial's losses as rows, with its parameters as columns, like the pipeline's steps/."""
    step = np.arange(len(losses), dtype=np.int32)
    frame = pd.DataFrame(
        {
            "trial": np.int32(number),
            "epoch": (step // spec.windows_per_epoch).astype(np.int16),
            "window": step % spec.windows_per_epoch,
            "step": step,
            "loss": losses,
        }
    )
    for name, value in asdict(spec).items():
        frame[name] = value
    return frame


def train_and_write(job: tuple[int, TrialSpec, str]) -> float:
    """Train trial `number` and write its steps to its own Parquet file in `folder`; returns
    the seconds its training loop took."""
    number, spec, folder = job
    result = train_trial(spec)
    path = os.path.join(folder, f"trial-{number:06d}.parquet")
    steps_frame(number, spec, result.losses).to_parquet(path, index=False)
    return result.seconds


def run_pool(specs: list[TrialSpec], processes: int, output: str) -> float:
    """Train every trial in a Pool of `processes` one-thread processes, longest first (so that
    they run out of work together); returns the seconds of training, summed over processes."""
    folder = os.path.join(output, "steps")
    os.makedirs(folder, exist_ok=True)
    jobs = [(number, spec, folder) for number, spec in enumerate(specs)]
    jobs.sort(key=lambda job: job[1].windows * job[1].num_layers, reverse=True)
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes, initializer=init_worker) as pool:
        return sum(pool.imap_unordered(train_and_write, jobs, chunksize=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A grid of trials of the plain loop in a Pool.")
    parser.add_argument("grid", help='JSON file: {"fixed": {...}, "axes": {...}}')
    parser.add_argument("--processes", type=int, default=2, help="Pool size (default 2)")
    parser.add_argument("--output", required=True, help="folder for steps/*.parquet")
    args = parser.parse_args(argv)
    with open(args.grid) as file:
        specs = grid_specs(json.load(file))
    busy = run_pool(specs, args.processes, args.output)
    print(json.dumps({"trials": len(specs), "training_s": busy}))


if __name__ == "__main__":
    main()
