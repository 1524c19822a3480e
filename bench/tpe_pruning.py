"""Does TPE learn from finished trials, and does pruning save the time it saves in steps?

The study of issue 9: TPE with Optuna's median pruner, 64 trials; train.lr log-range 0.01-3,
model.state_size [4, 8], model.num_layers [1, 2]; echo step 6, 2 epochs of the tutorial's
task (series 50,000, batch 5, truncation 15: 666 windows an epoch). Run side by side in one run,
each as `python -m pipeline study` in a fresh process, Ray embedded with `--cores` CPUs:

1. TPE + median pruner;
2. TPE, no pruner;
3. random sampler, no pruner (unless --no-random): what TPE's asking costs against a sampler
   that needs no feedback.

Printed for each, from its results (the Optuna journal and steps/):
- feedback share: for each trial after the first `--startup` (16), the share of the trials
  numbered before it that Optuna had been told of (datetime_complete) when it was asked
  (datetime_start); the median over those trials. 1.0 in a sequential study; 0.0 means TPE
  sampled blind, i.e. random search. Goal (issue 9): ≥ 0.5 with TPE.
- wall s: the process from launch to exit; trials span s: first ask to last tell (the journal's
  datetimes), which leaves out the fixed costs (imports, Ray, summary);
- steps: rows in steps/ (the windows the trials trained); layer-steps: the same, each weighted
  by its trial's num_layers, since TPE picks other depths with and without a pruner and a
  2-layer window costs about twice a 1-layer one.

Then the ratios: wall(pruned) / wall(no pruner) and span(pruned) / span(no pruner) next to
steps(pruned) / steps(no pruner); goals: wall within 0.15 of steps (issue 9), span within 0.10
of steps (issue 21), i.e. pruning saves the time it saves in steps. The span leaves out the
fixed costs, so it is the sharper test.
The same for TPE against random, whose steps are equal: the wall ratio is TPE's overhead.
Goals are printed, never asserted.

A short warm-up study of the same architectures runs first (in the usual kernel caches), so
that no timed run pays for compiling kernels the others then reuse.

    python bench/tpe_pruning.py           # 3 studies of 64 trials: about 5 minutes on two cores
    python bench/tpe_pruning.py --quick   # 24 trials of 400 windows, about a minute; checks the
                                          # script, its figures mean little
    python bench/tpe_pruning.py --no-random --set study.report_every=50
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from harness import (
    load_journal_trials,
    run_study_cli,
    steps_rows,
    work_folder,
    write_config,
)
from report import machine, say, table

SEARCH = {
    "train.lr": {"low": 0.01, "high": 3.0, "log": True},
    "model.state_size": [4, 8],
    "model.num_layers": [1, 2],
}
TASK = {"series_length": 50_000, "echo_step": 6, "batch_size": 5, "truncation": 15}
EPOCHS = 2
TRIALS, STARTUP = 64, 16
QUICK = {"trials": 24, "startup": 8, "series_length": 15_000}  # 200 windows an epoch
# The warm-up: every architecture of the search, a few windows each.
WARMUP_SERIES_LENGTH = 1_500
FEEDBACK_GOAL = 0.5
RATIO_GOAL = 0.15
SPAN_RATIO_GOAL = 0.10
RUNS = {
    "tpe-median": ("tpe", "median"),
    "tpe-none": ("tpe", "none"),
    "random-none": ("random", "none"),
}


@dataclass(frozen=True)
class StudyRun:
    """One measured study."""

    name: str
    sampler: str
    pruner: str
    wall: float
    span: float
    """Seconds from the first trial's ask to the last trial's tell."""
    steps: int
    layer_steps: int
    """Steps weighted by their trial's number of layers: what they cost, roughly."""
    states: dict[str, int]
    feedback: float | None


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    trials = args.trials or (QUICK["trials"] if args.quick else TRIALS)
    startup = QUICK["startup"] if args.quick else STARTUP
    if args.startup is not None:
        startup = args.startup
    series_length = QUICK["series_length"] if args.quick else TASK["series_length"]
    load = machine()
    names = [name for name in RUNS if not (args.no_random and name.startswith("random"))]
    with work_folder("echo-tpe-", args.keep) as folder:
        if not args.no_warmup:
            _warm_up(args, folder)
        runs = [_run(name, args, trials, startup, series_length, folder) for name in names]
        print(_report(args, trials, startup, series_length, load, runs))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2, help="CPUs of the embedded Ray")
    parser.add_argument("--quick", action="store_true", help="24 short trials: a smoke run")
    parser.add_argument("--trials", type=int, help=f"trials per study (default {TRIALS})")
    parser.add_argument(
        "--startup", type=int, help=f"trials left out of the feedback share (default {STARTUP})"
    )
    parser.add_argument("--no-random", action="store_true", help="skip the random-sampler run")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up study")
    parser.add_argument("--keep", action="store_true", help="keep the outputs and logs")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    return parser


def _study_config(name: str, trials: int, series_length: int) -> dict:
    sampler, pruner = RUNS[name]
    return {
        "study": {
            "name": name,
            "sampler": sampler,
            "pruner": pruner,
            "trials": trials,
            "seed": 0,
            "search": SEARCH,
        },
        "task": {**TASK, "series_length": series_length},
        "train": {"epochs": EPOCHS},
        "ray": {"cpus_per_trainer": 1},
    }


def _warm_up(args: argparse.Namespace, folder: Path) -> None:
    """A short grid over the searched architectures, so that kernels are compiled (or loaded
    into the OS's file cache) before the timed runs."""
    say("warm-up: every architecture of the search, a few windows each")
    grid = {key: values for key, values in SEARCH.items() if isinstance(values, list)}
    raw = {
        "study": {"name": "warm-up", "sampler": "grid", "search": grid},
        "task": {**TASK, "series_length": WARMUP_SERIES_LENGTH},
        "train": {"epochs": 1},
    }
    config = write_config(folder / "warm-up.yaml", raw)
    overrides = [f"ray.num_cpus={args.cores}", *args.set]
    run_study_cli(config, folder / "warm-up", folder / "warm-up.log", overrides)


def _run(
    name: str,
    args: argparse.Namespace,
    trials: int,
    startup: int,
    series_length: int,
    folder: Path,
) -> StudyRun:
    sampler, pruner = RUNS[name]
    say(f"{name}: {trials} trials, sampler {sampler}, pruner {pruner}")
    config = write_config(folder / f"{name}.yaml", _study_config(name, trials, series_length))
    output = folder / name
    overrides = [f"ray.num_cpus={args.cores}", *args.set]
    run = run_study_cli(config, output, folder / f"{name}.log", overrides)
    journal = load_journal_trials(output, name)
    finished = [t for t in journal if t.datetime_complete is not None]
    span = max(t.datetime_complete for t in finished) - min(t.datetime_start for t in journal)
    return StudyRun(
        name=name,
        sampler=sampler,
        pruner=pruner,
        wall=run.seconds,
        span=span.total_seconds(),
        steps=steps_rows(output),
        layer_steps=_layer_steps(output),
        states=dict(Counter(t.state.name for t in journal)),
        feedback=feedback_share(journal, startup),
    )


def _layer_steps(output: Path) -> int:
    """The sum of num_layers over every row of steps/."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    layers = ds.dataset(output / "steps", format="parquet").to_table(columns=["num_layers"])
    return int(pc.sum(layers["num_layers"]).as_py() or 0)


def feedback_share(trials: list, startup: int) -> float | None:
    """For each trial after the first `startup` (by number), the share of earlier-numbered
    trials that had been told (datetime_complete) before it was asked (datetime_start); the
    median over those trials, or None when there are none."""
    ordered = sorted(trials, key=lambda t: t.number)
    shares = []
    for position, trial in enumerate(ordered):
        # The first trial has no earlier one to have heard of.
        if position < max(startup, 1) or trial.datetime_start is None:
            continue
        earlier = ordered[:position]
        told = sum(
            1
            for other in earlier
            if other.datetime_complete is not None
            and other.datetime_complete <= trial.datetime_start
        )
        shares.append(told / len(earlier))
    return statistics.median(shares) if shares else None


def _report(
    args: argparse.Namespace,
    trials: int,
    startup: int,
    series_length: int,
    load: str,
    runs: list[StudyRun],
) -> str:
    windows = series_length // TASK["batch_size"] // TASK["truncation"]
    search = ", ".join(f"{key} {value}" for key, value in SEARCH.items())
    studies = [
        [
            run.name,
            f"{run.wall:.1f}",
            f"{run.span:.1f}",
            f"{run.steps:,}",
            f"{run.layer_steps:,}",
            ", ".join(f"{n} {state}" for state, n in sorted(run.states.items())),
            "-" if run.feedback is None else f"{run.feedback:.2f}",
            f"≥ {FEEDBACK_GOAL}" if run.sampler == "tpe" else "",
        ]
        for run in runs
    ]
    by_name = {run.name: run for run in runs}
    ratios = [_ratio_row("pruned / no pruner (TPE)", by_name, "tpe-median", "tpe-none", True)]
    if "random-none" in by_name:
        ratios.append(
            _ratio_row("TPE / random (no pruner)", by_name, "tpe-none", "random-none", False)
        )
    lines = [
        f"### TPE and pruning: {trials} trials × {_epochs(args)} epochs × {windows} windows "
        f"({args.cores} cores)",
        "",
        f"- search: {search}; echo step {TASK['echo_step']}; overrides: "
        + ", ".join(f"`{s}`" for s in [f"ray.num_cpus={args.cores}", *args.set]),
        f"- feedback share: median, over trials after the first {startup}, of the share of "
        "earlier-numbered trials told before the trial was asked (sequential Optuna: 1.0)",
        "- wall s: the process from launch to exit; trials span s: first ask to last tell; "
        "steps: rows in steps/; layer-steps: the same weighted by num_layers",
        f"- {load}",
        "",
        *table(
            [
                "study",
                "wall s",
                "trials span s",
                "steps",
                "layer-steps",
                "trials",
                "feedback share",
                "goal",
            ],
            studies,
        ),
        "",
        *table(
            [
                "ratio",
                "wall",
                "trials span",
                "steps",
                "layer-steps",
                "wall − steps",
                f"goal (issue 9): within {RATIO_GOAL}",
                "span − steps",
                f"goal (issue 21): within {SPAN_RATIO_GOAL}",
            ],
            ratios,
        ),
    ]
    return "\n".join(lines)


def _epochs(args: argparse.Namespace) -> int:
    """The trials' epochs: EPOCHS, unless `--set train.epochs=N` says otherwise."""
    given = [s.split("=", 1)[1] for s in args.set if s.startswith("train.epochs=")]
    return int(given[-1]) if given else EPOCHS


def _ratio_row(
    label: str, runs: dict[str, StudyRun], top: str, bottom: str, goal: bool
) -> list[str]:
    a, b = runs[top], runs[bottom]
    wall, span, steps = a.wall / b.wall, a.span / b.span, a.steps / b.steps
    return [
        label,
        f"{wall:.2f}",
        f"{span:.2f}",
        f"{steps:.2f}",
        f"{a.layer_steps / b.layer_steps:.2f}",
        f"{wall - steps:+.2f}",
        _met(wall - steps, RATIO_GOAL) if goal else "",
        f"{span - steps:+.2f}",
        _met(span - steps, SPAN_RATIO_GOAL) if goal else "",
    ]


def _met(difference: float, goal: float) -> str:
    return "met" if abs(difference) <= goal else "not met"


if __name__ == "__main__":
    main()
