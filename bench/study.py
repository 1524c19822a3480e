"""Wall time of a whole study with our pipeline, against its trials run one by one.

What is measured, side by side in one run on the same cores (`--cores`, default 2):
1. Our pipeline end to end: `pipeline.study.run_study` on the study's config (by default
   configs/study.yaml: 336 trials of 3,330 windows), Ray started embedded with `--cores` CPUs and
   one CPU per task, compile as configured, results written to a fresh temporary folder. The
   clock runs from the call to its return, so Ray's start-up and shutdown are in it. Twice:
   cold, with the kernels' cache (NUMBA_CACHE_DIR) pointed at a fresh empty folder, as on a
   fresh machine, so the compile is in it; then warm, with that folder as the first run left it.
2. The straightforward loop (bench/baseline.py) on exactly the trials our run ran (read back from
   its trials.parquet: same layers, state size, echo step, learning rate, epochs and seeds),
   one trial at a time in each of `--cores` processes of one thread (a multiprocessing Pool,
   longest trials first). Its clock starts once the pool's processes are up, which favours it.
3. Ray workers: the same study (at `--scaling-epochs` epochs, to keep it short) with
   `ray.num_cpus` 1 against `--cores`.

Why: a study of small LSTMs is overhead-bound, and the pipeline trains the trials of one
architecture in lockstep to beat that. The targets this measures (and never asserts): the study
≥ 15× faster end to end than its trials one by one, and two Ray workers ≥ 1.8× one.

    python bench/study.py                  # study.yaml in full, then 1 against 2 workers at
                                           # 2 epochs: about 10-15 minutes on two cores
    python bench/study.py --epochs 1       # every trial, a fifth of the windows
    python bench/study.py --trials 48      # 48 trials of the grid, as its sampler picks them
    python bench/study.py --quick          # a smoke run: 24 trials of 1 epoch (2-3 minutes);
                                           # about 2 trials per architecture, so little lockstep:
                                           # it checks the script, its ratios mean little
    python bench/study.py configs/quick.yaml --set model.state_size=8
    python bench/study.py --wide --no-scaling   # configs/wide.yaml (96 trials at states 32-128,
                                           # 2 epochs) against the loop: about 15 minutes
    python bench/study.py --scaling-only   # only 1 against 2 workers (about a minute)

Ray starts embedded with RAY_AUTH_MODE=disabled and RAY_ADDRESS unset; `run_study` stops it.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass

import pandas as pd
import ray
import this_checkout  # noqa: F401  (first on the path: this checkout's pipeline)
from baseline import TrialSpec, init_worker, train_trial
from report import say, times

from pipeline.config import Config, ConfigError, load_config
from pipeline.results.tables import FIXED_COLUMNS, load_trials
from pipeline.study.driver import StudyOutcome, run_study

DEFAULT_CONFIG = "configs/study.yaml"
WIDE_CONFIG = "configs/wide.yaml"
QUICK = {"epochs": 1, "trials": 24, "scaling_epochs": 1}
TARGETS = (
    "Targets: the study ≥ 15× faster than the loop, cold (issues 6 and 10), configs/wide.yaml "
    "≥ 8× (issue 24); 2 Ray workers ≥ 1.8× one (issues 6 and 24)."
)


@dataclass(frozen=True)
class Timing:
    """One measured run: its wall time, and the time spent inside training loops."""

    seconds: float
    busy: float
    """Seconds inside training loops, summed over processes (ours: over Ray tasks)."""


@dataclass(frozen=True)
class StudyRun(Timing):
    """One measured run of our pipeline, with its trials.parquet."""

    trials: pd.DataFrame
    outcome: StudyOutcome


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, getattr(args, name) or value)
    if args.wide:
        if args.config != DEFAULT_CONFIG:
            sys.exit(f"error: --wide runs {WIDE_CONFIG}; give either it or a config, not both")
        args.config = WIDE_CONFIG
    if args.no_scaling and args.scaling_only:
        sys.exit("error: --no-scaling and --scaling-only leave nothing to run; give one")
    _embedded_ray_only()
    try:
        config = _bench_config(args)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    scaling = config.with_params(
        {"train.epochs": args.scaling_epochs or min(2, config.train.epochs)}
    )
    load = os.getloadavg()[0]
    report = []
    if not args.scaling_only:
        say(f"our pipeline: {_describe(config)} on {args.cores} Ray workers, cold then warm")
        with _fresh_kernel_cache():
            cold = _run_study(config, args.cores)
            ours = _run_study(config, args.cores)
        specs = _trial_specs(config, ours.trials)
        say(f"the straightforward loop: the same {len(specs)} trials in {args.cores} processes")
        loop = _run_loop(specs, args.cores)
        report += _pipeline_report(args, config, specs, load, cold, ours, loop)
    if not args.no_scaling:
        say(f"Ray workers: {_describe(scaling)} on 1 worker, then on {args.cores}")
        load = os.getloadavg()[0]
        if args.scaling_only:
            # The first study in a process pays its imports (Ray's first start took 2.2 s
            # against 1.4 after): a short one first, so that neither timed run does.
            _run_study(scaling.with_params({"study.trials": 2, "train.epochs": 1}), 1)
        one = _run_study(scaling, 1)
        many = _run_study(scaling, args.cores)
        report += _scaling_report(args, scaling, load, one, many)
    print("\n".join([*report, TARGETS]))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="a study config")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument("--epochs", type=int, help="train.epochs (default: the config's)")
    parser.add_argument(
        "--trials", type=int, help="study.trials: a subset, picked by the study's sampler"
    )
    parser.add_argument(
        "--scaling-epochs", type=int, help="epochs of the 1-against-N workers runs (default 2)"
    )
    parser.add_argument("--cores", type=int, default=2, help="cores for both sides (default 2)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run (24 trials, 1 epoch), not representative"
    )
    parser.add_argument("--wide", action="store_true", help=f"the config {WIDE_CONFIG}")
    parser.add_argument(
        "--no-scaling", action="store_true", help="skip the 1-against-N workers runs"
    )
    parser.add_argument(
        "--scaling-only", action="store_true", help="only the 1-against-N workers runs"
    )
    return parser


def _embedded_ray_only() -> None:
    """Make `run_study` start its own Ray here rather than join one named in the environment;
    without token authentication, as other local Ray instances here run."""
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_AUTH_MODE"] = "disabled"


def _bench_config(args: argparse.Namespace) -> Config:
    """The study's config with the options applied; on the CPU, one core per Ray task."""
    overrides = [*args.set, "train.device=cpu", "ray.cpus_per_trainer=1", "ray.address=null"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.trials:
        overrides.append(f"study.trials={args.trials}")
    return load_config(args.config, overrides)


@contextmanager
def _fresh_kernel_cache() -> Iterator[None]:
    """NUMBA_CACHE_DIR pointed at a fresh empty folder (the kernels' cache: kernel_cache.py),
    removed after; the Ray started inside inherits it."""
    before = os.environ.get("NUMBA_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="echo-bench-kernels-") as folder:
        os.environ["NUMBA_CACHE_DIR"] = folder
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("NUMBA_CACHE_DIR", None)
            else:
                os.environ["NUMBA_CACHE_DIR"] = before


def _run_study(config: Config, workers: int) -> StudyRun:
    """Run the study with `workers` CPUs of embedded Ray into a fresh folder, deleted after."""
    folder = tempfile.mkdtemp(prefix="echo-bench-")
    run_config = config.with_params(
        {"ray.num_cpus": workers, "output": os.path.join(folder, "study")}
    )
    try:
        started = time.perf_counter()
        # Per-trial lines (when stderr is not a terminal) stay out of the result on stdout.
        with redirect_stdout(sys.stderr):
            outcome = run_study(run_config, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - started
        trials = load_trials(run_config.output)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    # Trials overlap in a trainer's lanes, so their durations add up to no training time.
    return StudyRun(seconds, math.nan, trials, outcome)


def _trial_specs(config: Config, trials: pd.DataFrame) -> list[TrialSpec]:
    """The loop's version of every trial our run ran, with the seed it ran with."""
    keys = {**FIXED_COLUMNS, **{p.short_name: p.key for p in config.study.search}}
    specs = []
    for row in trials.to_dict("records"):
        trial = config.with_params({key: row[name] for name, key in keys.items()})
        specs.append(
            TrialSpec(
                num_layers=trial.model.num_layers,
                state_size=trial.model.state_size,
                echo_step=trial.task.echo_step,
                lr=trial.train.lr,
                epochs=trial.train.epochs,
                series_length=trial.task.series_length,
                batch_size=trial.task.batch_size,
                truncation=trial.task.truncation,
                seed=row["trial_seed"],
            )
        )
    return specs


def _run_loop(specs: list[TrialSpec], cores: int) -> Timing:
    """How long `cores` one-thread processes take to train every trial, one at a time."""
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(cores + 1)
    # Longest first, so that the processes run out of work at about the same time.
    ordered = sorted(specs, key=lambda s: s.windows * s.num_layers, reverse=True)
    with context.Pool(cores, initializer=init_worker, initargs=(ready,)) as pool:
        ready.wait()
        started = time.perf_counter()
        busy = sum(r.seconds for r in pool.imap_unordered(train_trial, ordered, chunksize=1))
        return Timing(time.perf_counter() - started, busy)


def _pipeline_report(
    args: argparse.Namespace,
    config: Config,
    specs: list[TrialSpec],
    load: float,
    cold: StudyRun,
    ours: StudyRun,
    loop: Timing,
) -> list[str]:
    """The README-ready result: what was measured, then a Markdown table of times and ratios."""
    windows = sum(s.windows for s in specs)
    return [
        f"### Study wall time: {args.config} ({_describe(config)}, {windows:,} windows)",
        "",
        f"- our pipeline: `run_study`, Ray embedded with {args.cores} CPUs (1 per trainer), "
        f"train.compile {config.train.compile}, pruner {config.study.pruner}; from the call to "
        f"its return, Ray's start-up included; trials {_states(ours)}",
        f"- the straightforward loop: the same {len(specs)} trials (layers, state size, echo "
        f"step, lr, epochs, seeds), one at a time in each of {args.cores} one-thread processes "
        "(multiprocessing Pool, longest first), timed from a started pool",
        "- training s: time inside the loop's training, summed over its processes (ours: -, "
        "trials overlap in lanes); the rest of wall s × cores is start-up, writing and idle",
        "- driver CPU s: the driver process's CPU time (`StudyOutcome.driver_cpu_seconds`); "
        "lanes per step: trials trained per step of a set of lanes, on average (the lockstep)",
        f"- 1-minute load average at the start: {load:.1f} on {os.cpu_count()} CPUs "
        "(other work on the machine skews every number)",
        "",
        "| run | cores | wall s | training s | driver CPU s | lanes per step | speed-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| straightforward loop, one trial at a time | {args.cores} | {loop.seconds:.1f} "
        f"| {loop.busy:.1f} | - | 1 | 1× |",
        f"| our pipeline, cold (empty kernel cache) | {args.cores} | {cold.seconds:.1f} | - "
        f"| {_driver(cold)} | {_lanes(cold)} | {times(loop.seconds / cold.seconds)} |",
        f"| our pipeline, warm | {args.cores} | {ours.seconds:.1f} | - "
        f"| {_driver(ours)} | {_lanes(ours)} | {times(loop.seconds / ours.seconds)} |",
        "",
    ]


def _scaling_report(
    args: argparse.Namespace, scaling: Config, load: float, one: StudyRun, many: StudyRun
) -> list[str]:
    """1 Ray worker against `--cores`, as a Markdown table, each run's wall time by phase."""
    rows = [
        (1, one, "1×", "1×"),
        (args.cores, many, _speed_up(one, many), _trials_speed_up(one, many)),
    ]
    return [
        f"### Ray workers: 1 against {args.cores} ({args.config}, {_describe(scaling)})",
        "",
        f"- 1-minute load average at the start: {load:.1f} on {os.cpu_count()} CPUs",
        "- phases (`StudyOutcome.phases`): set-up (checks, Ray's start, the storage), trials "
        "(the driver's loop: the trainers' start, training, the last records), summary",
        f"- only the trials are split between workers: with the set-up and summary of the "
        f"1-worker run, {args.cores} workers could run at most "
        f"{times(_phases_bound(one, args.cores))} one, their trials split perfectly",
        "",
        "| Ray workers | wall s | set-up s | trials s | summary s | driver CPU s "
        "| lanes per step | speed-up | trials' speed-up |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {workers} | {run.seconds:.1f} | {run.outcome.phases.setup:.1f} "
            f"| {run.outcome.phases.trials:.1f} | {run.outcome.phases.summary:.1f} "
            f"| {_driver(run)} | {_lanes(run)} | {speed_up} | {trials_speed_up} |"
            for workers, run, speed_up, trials_speed_up in rows
        ),
        "",
    ]


def _speed_up(one: StudyRun, many: StudyRun) -> str:
    return times(one.seconds / many.seconds)


def _trials_speed_up(one: StudyRun, many: StudyRun) -> str:
    return times(one.outcome.phases.trials / many.outcome.phases.trials)


def _phases_bound(one: StudyRun, workers: int) -> float:
    """The most that `workers` could gain on the 1-worker run: its trials phase split evenly,
    everything else as long as it was."""
    trials = one.outcome.phases.trials
    return one.seconds / (one.seconds - trials + trials / workers)


def _driver(run: StudyRun) -> str:
    return f"{run.outcome.driver_cpu_seconds:.1f}"


def _lanes(run: StudyRun) -> str:
    """Trials trained per step of a set of lanes, on average."""
    outcome = run.outcome
    return f"{outcome.lane_windows / max(1, outcome.windows_stepped):.1f}"


def _describe(config: Config) -> str:
    """How much a study is: its trials, epochs and windows per trial."""
    return (
        f"{config.study.n_trials} trials × {config.train.epochs} epochs × "
        f"{config.task.windows_per_epoch} windows"
    )


def _states(run: StudyRun) -> str:
    """How the run's trials ended, e.g. `336 COMPLETE`."""
    counts = run.trials["state"].value_counts()
    return ", ".join(f"{count} {state}" for state, count in counts.items())


if __name__ == "__main__":
    main()
