"""Per-core throughput of our lockstep trainer against the straightforward per-trial loop.

What is measured: model-windows per second on ONE thread (`torch.set_num_threads(1)`), where a
model-window is one truncated-BPTT update of one model (forward over 15 steps, backward,
Adagrad). Our trainer (`pipeline.train.train`) trains K models of one architecture in lockstep,
so it does K model-windows per window; the straightforward loop (bench/baseline.py: `nn.LSTM`,
`nn.Linear`, `torch.optim.Adagrad`, one trial at a time) does one. Both run the tutorial's task
(batch 5, truncation 15, state carried across windows), both regenerate their data every epoch
inside the timed loop, and both are timed in the same run, side by side, so that the printed
ratios hold even when the absolute numbers drift with the machine's load.

Why: small LSTMs are overhead-bound, so a window of one model costs about as much as a window of
many stacked on a trial axis. DESIGN.md sets the target at ≥ 50× the loop per core at K = 128
for state 4 and 3 layers; this script measures it (and never asserts it).

How: each measurement is a warm-up run, then runs of whole short epochs long enough to take
about `--seconds`, repeated `--repeats` times round-robin; the best rate of each is reported.
Our trainer's time is its `TrainResult.seconds` (its training loop, excluding set-up). The
compiled trainer's first call pays torch.compile's compile (about 60-90 s per state size cold on
a quiet machine, seconds when /tmp/torchinductor_* holds it from an earlier run): it is reported
separately and never timed as training. Where torch.compile is unavailable, the trainer falls
back to eager and the table says so.

    python bench/trainer.py            # states 4 and 16, K = 1, 8, 32, 128 (a few minutes)
    python bench/trainer.py --quick    # state 4, K = 1 and 128 (about two minutes)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import this_checkout  # noqa: F401  (first on the path: this checkout's pipeline)
import torch
from baseline import TrialSpec, train_trial
from report import say, times

from pipeline.config import Config
from pipeline.train import train

BATCH_SIZE = 5
TRUNCATION = 15
ECHO_STEP = 3
LR = 0.3
# Timed runs are whole epochs of this many windows, so every run regenerates its data as often.
EPOCH_WINDOWS = 25
WARMUP_WINDOWS = 10
MODES = ("eager", "compiled")
T = TypeVar("T")
TARGET_STATE, TARGET_K, TARGET_LAYERS = 4, 128, 3
TARGET = "Target (DESIGN.md): compiled ≥ 50× the loop at K = 128, state 4, 3 layers"


@dataclass(frozen=True)
class Measurement:
    """One timed run: how many model-windows it did, in how many seconds of its loop."""

    model_windows: int
    seconds: float
    cpu_ratio: float
    """Process CPU time over wall time around the run: about 1.0 on one thread."""

    @property
    def rate(self) -> float:
        return self.model_windows / self.seconds


@dataclass
class Contender:
    """Something to time: the loop, or our trainer in one mode at one K, for one state size."""

    state_size: int
    mode: str
    """baseline, eager or compiled."""
    count: int
    """Models in lockstep (1 for the baseline, which trains one trial at a time)."""
    windows: int = EPOCH_WINDOWS
    """Windows of each timed run, sized from the warm-up."""
    best: Measurement | None = None

    def run(self, layers: int, windows: int) -> Measurement:
        if self.mode == "baseline":
            return _time_baseline(self.state_size, layers, windows)
        compiled = self.mode == "compiled"
        return _time_trainer(self.state_size, layers, self.count, compiled, windows)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    _fill_defaults(args)
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    compile_notes = {state: _compile(state, args.layers) for state in args.states}
    contenders = [
        Contender(state, mode, count)
        for state in args.states
        for mode, count in [("baseline", 1), *((m, k) for m in MODES for k in args.ks)]
        if mode != "compiled" or compile_notes[state] is not None
    ]
    for contender in contenders:
        say(f"warm-up: state {contender.state_size}, {contender.mode}, K = {contender.count}")
        warm = contender.run(args.layers, WARMUP_WINDOWS)
        contender.windows = _windows_for(args.seconds, warm)
    # Round-robin, so that a spell of load elsewhere on the machine hits every contender alike.
    for repeat in range(args.repeats):
        say(f"timing, round {repeat + 1} of {args.repeats}")
        for contender in contenders:
            measured = contender.run(args.layers, contender.windows)
            if contender.best is None or measured.rate > contender.best.rate:
                contender.best = measured
    print(_report(args, load, contenders, compile_notes))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: state 4, K = 1, 128")
    parser.add_argument("--states", type=int, nargs="+", help="state sizes (default: 4 16)")
    parser.add_argument("--ks", type=int, nargs="+", help="models in lockstep (1 8 32 128)")
    parser.add_argument("--layers", type=int, default=3, help="LSTM layers (default: 3)")
    parser.add_argument("--seconds", type=float, help="length of each timed run (2; quick 1)")
    parser.add_argument("--repeats", type=int, help="timed runs of each, best kept (3; quick 1)")
    return parser


def _fill_defaults(args: argparse.Namespace) -> None:
    """The defaults of the options left out, which depend on --quick."""
    args.states = args.states or ([4] if args.quick else [4, 16])
    args.ks = args.ks or ([1, 128] if args.quick else [1, 8, 32, 128])
    args.seconds = args.seconds or (1.0 if args.quick else 2.0)
    args.repeats = args.repeats or (1 if args.quick else 3)


def _compile(state_size: int, layers: int) -> str | None:
    """Compile our training step for this architecture: how long it took, or None when
    torch.compile is unavailable here (the trainer then warns and trains eager)."""
    say(f"compiling the training step for state {state_size} (cold: about 60-90 s)")
    started = time.perf_counter()
    with _compile_warnings() as warnings:
        # Any K will do: the trainer marks the model axis dynamic, so one compile serves all.
        _time_trainer(state_size, layers, 2, True, WARMUP_WINDOWS)
    if warnings:
        say(f"no compiled measurements for state {state_size}: {warnings[0]}")
        return None
    return f"{time.perf_counter() - started:.1f} s"


@contextmanager
def _compile_warnings() -> Iterator[list[str]]:
    """The warnings the trainer logs while it runs, e.g. that torch.compile failed."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("pipeline.train")
    handler = Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _windows_for(seconds: float, warm: Measurement) -> int:
    """Whole epochs worth about `seconds` at the warm-up's pace (at least one epoch)."""
    per_window = warm.seconds / WARMUP_WINDOWS
    return max(1, math.ceil(seconds / per_window / EPOCH_WINDOWS)) * EPOCH_WINDOWS


def _epochs(windows: int) -> tuple[int, int]:
    """(epochs, windows per epoch) of a run of `windows` windows."""
    per_epoch = min(windows, EPOCH_WINDOWS)
    return windows // per_epoch, per_epoch


def _time_baseline(state_size: int, layers: int, windows: int) -> Measurement:
    """The straightforward loop on one trial for `windows` windows."""
    epochs, per_epoch = _epochs(windows)
    spec = TrialSpec(
        num_layers=layers,
        state_size=state_size,
        echo_step=ECHO_STEP,
        lr=LR,
        epochs=epochs,
        series_length=BATCH_SIZE * TRUNCATION * per_epoch,
        batch_size=BATCH_SIZE,
        truncation=TRUNCATION,
        seed=0,
    )
    result, cpu_ratio = _with_cpu_ratio(lambda: train_trial(spec))
    return Measurement(spec.windows, result.seconds, cpu_ratio)


def _time_trainer(
    state_size: int, layers: int, count: int, compiled: bool, windows: int
) -> Measurement:
    """Our trainer on `count` models in lockstep for `windows` windows."""
    epochs, per_epoch = _epochs(windows)
    base = Config().with_params(
        {
            "task.series_length": BATCH_SIZE * TRUNCATION * per_epoch,
            "task.batch_size": BATCH_SIZE,
            "task.truncation": TRUNCATION,
            "task.echo_step": ECHO_STEP,
            "model.num_layers": layers,
            "model.state_size": state_size,
            "train.epochs": epochs,
            "train.lr": LR,
            "train.compile": compiled,
            "train.device": "cpu",
        }
    )
    configs = [base.with_params({"train.seed": seed}) for seed in range(count)]
    result, cpu_ratio = _with_cpu_ratio(lambda: train(configs))
    return Measurement(count * epochs * per_epoch, result.seconds, cpu_ratio)


def _with_cpu_ratio(run: Callable[[], T]) -> tuple[T, float]:
    """run()'s result, and the process's CPU time over the wall time it took (1.0 on one
    thread; more means torch used more threads than the one it was given)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, (time.process_time() - cpu) / (time.perf_counter() - wall)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            ]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def _report(
    args: argparse.Namespace,
    load: float,
    contenders: list[Contender],
    notes: dict[int, str | None],
) -> str:
    """The README-ready result: how it was measured, then a Markdown table of rates and ratios."""
    best = {(c.state_size, c.mode, c.count): c.best for c in contenders}
    cpu_ratio = max(c.best.cpu_ratio for c in contenders if c.best)
    lines = [
        f"### Trainer throughput per core ({args.layers} layers, batch {BATCH_SIZE}, "
        f"truncation {TRUNCATION})",
        "",
        f"- torch {torch.__version__} on 1 thread of {_cpu_name()} "
        f"(CPU time / wall time of the timed runs: at most {cpu_ratio:.2f})",
        f"- model-windows per second, best of {args.repeats} timed run(s) of about "
        f"{args.seconds:g} s; (×) is the ratio to the straightforward per-trial loop timed in "
        "the same run (one trial at a time: its rate does not depend on K)",
        "- torch.compile's first call, not in the rates: "
        + ", ".join(
            f"state {state} {note or 'unavailable (torch.compile failed here)'}"
            for state, note in notes.items()
        ),
        f"- 1-minute load average at the start: {load:.1f} on {os.cpu_count()} CPUs (a busy "
        "machine skews the numbers, the ratios less so)",
        "",
        "| state | K | baseline win/s | eager win/s (×) | compiled win/s (×) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for state in args.states:
        base = best[(state, "baseline", 1)].rate
        for count in args.ks:
            eager, compiled = (_cell(best.get((state, mode, count)), base) for mode in MODES)
            lines.append(f"| {state} | {count} | {base:,.0f} | {eager} | {compiled} |")
    target = best.get((TARGET_STATE, "compiled", TARGET_K))
    if args.layers == TARGET_LAYERS and target is not None:
        ratio = target.rate / best[(TARGET_STATE, "baseline", 1)].rate
        lines += ["", f"{TARGET}: measured {times(ratio)}."]
    return "\n".join(lines)


def _cell(measured: Measurement | None, baseline: float) -> str:
    """A rate and its ratio to the baseline's, or n/a when it could not be measured."""
    if measured is None:
        return "n/a"
    return f"{measured.rate:,.0f} ({times(measured.rate / baseline)})"


if __name__ == "__main__":
    main()
