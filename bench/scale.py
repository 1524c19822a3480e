"""How the driver's cost and the results grow with the size of a study of tiny trials.

Tiny trials (issue 12): task.series_length 750, batch 5, truncation 15 (10 windows), 1 epoch,
1 layer of 4 units, the config's default compile; so the trials cost almost nothing and what is
measured is the study around them. Study sizes 500, 2,000 and 10,000 (and 100,000 with
--full), each with two samplers:
- grid: train.seed × train.lr axes, as square as the size allows (25 × 20, 50 × 40,
  100 × 100, 400 × 250), the learning rates log-spaced over [0.05, 1];
- random: train.lr log-range [0.05, 1], train.seed range [0, 999999].

Each study runs in a fresh process (`pipeline.study.run_study`, Ray embedded with `--cores`
CPUs) into a fresh folder; printed for each:
- wall s (the process, launch to exit), study s (`StudyOutcome.seconds`), trials/s (trials over
  study s) and ms per extra trial (the study s gained from the previous size, per trial);
- driver CPU ms per trial (`StudyOutcome.driver_cpu_seconds`: the driver process alone);
- steps files: the Parquet files under steps/; read s: `pd.read_parquet(OUTPUT/steps)`
  (its rows are checked: trials × 10);
- journal MB; reopen s: `optuna.load_study` + `get_trials` on the journal; resume s: the
  same `python -m pipeline study` command rerun on the finished output (it finds nothing to do;
  the trials in the journal are checked to be unchanged).

Goals (issue 12), printed, never asserted: 10,000 trials in ≤ 60 s on 2 cores, their steps read
in ≤ 3 s, steps files not one per trial.

    python bench/scale.py            # 500, 2,000, 10,000 × grid and random: today about 10
                                     # minutes on two cores (the 10,000 grid takes ~130 s)
    python bench/scale.py --full     # and 100,000: add about 5 minutes per sampler at the goal
                                     # rate; hours with today's driver (its grid sampler costs
                                     # grow with the study)
    python bench/scale.py --quick    # 100 and 400 trials, resume timed at 400 only: about a
                                     # minute on a quiet machine; checks the script
    python bench/scale.py --sizes 1000 --samplers random --set train.compile=false
    python bench/scale.py --sizes 3000 --samplers random --storage postgresql://u@host/db
                                     # each study on the journal file, then on the database
                                     # (a fresh study name each run), side by side

With --storage, "journal MB" is "-" for the database rows, and reopen s is `open_storage`
+ `optuna.load_study` + `get_trials` on the database.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from harness import (
    last_json_line,
    load_journal_trials,
    run_child,
    run_study_cli,
    visible_files,
    work_folder,
    write_config,
)
from report import machine, say, table

SIZES = [500, 2_000, 10_000]
FULL_SIZES = [*SIZES, 100_000]
QUICK_SIZES = [100, 400]
SAMPLERS = ("grid", "random")
TASK = {"series_length": 750, "echo_step": 3, "batch_size": 5, "truncation": 15}
WINDOWS = 10
LR_LOW, LR_HIGH = 0.05, 1.0
SEED_HIGH = 999_999
GOALS = (
    "Goals (issue 12): 10,000 trials in ≤ 60 s on 2 cores; their steps read in ≤ 3 s; "
    "steps files not one per trial."
)


@dataclass(frozen=True)
class ScaleRun:
    """One measured study of `trials` tiny trials."""

    storage: str
    """"journal" (the file in the output), or "database" (--storage)."""
    sampler: str
    trials: int
    wall: float
    study: float
    driver_cpu: float
    ran: int
    files: int
    read: float
    rows: int
    journal_bytes: int
    reopen: float
    resume: float | None
    """Seconds of the rerun on the finished output; None when not measured (--quick)."""
    resume_ok: bool


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.child:
        _child(*args.child, args.set)
        return
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES if args.full else SIZES)
    load = machine()
    runs = []
    with work_folder("echo-scale-", args.keep) as folder:
        storages = [None, args.storage] if args.storage else [None]
        token = time.strftime("%Y%m%d-%H%M%S")  # a fresh study in a database each run
        for sampler in args.samplers:
            for size in sorted(sizes):
                # A rerun costs a whole study's fixed costs: a smoke run does the largest only.
                resume = not args.quick or size == max(sizes)
                for storage in storages:  # side by side, so that both meet the same load
                    runs.append(_measure(sampler, size, args, folder, resume, storage, token))
        print(_report(args, load, runs))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2, help="CPUs of the embedded Ray")
    parser.add_argument("--quick", action="store_true", help="100 and 400 trials: a smoke run")
    parser.add_argument("--full", action="store_true", help="add the 100,000-trial studies")
    parser.add_argument("--sizes", type=int, nargs="+", help="study sizes instead")
    parser.add_argument(
        "--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS), help="samplers"
    )
    parser.add_argument("--keep", action="store_true", help="keep the outputs and logs")
    parser.add_argument(
        "--storage",
        help="also run each study on this Optuna storage URL (e.g. postgresql://...)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    # Internal: run one study in this process and print its StudyOutcome as JSON.
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "OUTPUT"), help=argparse.SUPPRESS)
    return parser


def _child(config_path: str, output: str, overrides: list[str]) -> None:
    """Run one study in-process: `run_study` says how much CPU the driver itself spent."""
    from pipeline.config import load_config
    from pipeline.study.driver import run_study

    config = load_config(config_path, overrides).with_params({"output": output})
    # Its line per finished trial goes to the log, so that stdout holds only the result.
    with redirect_stdout(sys.stderr):
        outcome = run_study(config, progress=False)
    print(
        json.dumps(
            {
                "seconds": outcome.seconds,
                "driver_cpu_seconds": outcome.driver_cpu_seconds,
                "ran": outcome.ran,
            }
        )
    )


def _measure(
    sampler: str,
    size: int,
    args: argparse.Namespace,
    folder: Path,
    resume: bool,
    storage: str | None = None,
    token: str = "",
) -> ScaleRun:
    name = f"scale-{sampler}-{size}" + (f"-db-{token}" if storage else "")
    say(f"{name}: {size:,} tiny trials, {sampler} sampler, {'database' if storage else 'journal'}")
    raw = _study_config(sampler, size, args)
    raw["study"] = {**raw["study"], "name": name, **({"storage": storage} if storage else {})}
    config = write_config(folder / f"{name}.yaml", raw)
    output = folder / name
    log = folder / f"{name}.log"
    sets = [arg for override in args.set for arg in ("--set", override)]
    argv = [sys.executable, "bench/scale.py", "--child", str(config), str(output), *sets]
    run = run_child(argv, log)
    outcome = last_json_line(run.stdout)

    started = time.perf_counter()
    steps = pd.read_parquet(output / "steps")
    read = time.perf_counter() - started
    rows = len(steps)
    del steps
    started = time.perf_counter()
    told = len(load_journal_trials(output, name, storage))
    reopen = time.perf_counter() - started

    resumed = None
    if resume:
        say("  resume: the same study again on its finished output")
        resumed = run_study_cli(config, output, log, args.set).seconds
    resume_ok = len(load_journal_trials(output, name, storage)) == told
    run_result = ScaleRun(
        storage="database" if storage else "journal",
        sampler=sampler,
        trials=size,
        wall=run.seconds,
        study=outcome["seconds"],
        driver_cpu=outcome["driver_cpu_seconds"],
        ran=outcome["ran"],
        files=visible_files(output / "steps"),
        read=read,
        rows=rows,
        journal_bytes=0 if storage else os.path.getsize(output / "study.journal"),
        reopen=reopen,
        resume=resumed,
        resume_ok=resume_ok,
    )
    if not args.keep:
        shutil.rmtree(output, ignore_errors=True)
    return run_result


def _study_config(sampler: str, size: int, args: argparse.Namespace) -> dict:
    """The tiny-trial study of `size` trials; `--set` overrides apply when it is loaded."""
    if sampler == "grid":
        seeds, lrs = grid_shape(size)
        search = {"train.seed": list(range(seeds)), "train.lr": _learning_rates(lrs)}
    else:
        search = {
            "train.seed": {"low": 0, "high": SEED_HIGH},
            "train.lr": {"low": LR_LOW, "high": LR_HIGH, "log": True},
        }
    return {
        "study": {
            "name": f"scale-{sampler}-{size}",
            "sampler": sampler,
            "trials": size,
            "search": search,
        },
        "task": TASK,
        "model": {"num_layers": 1, "state_size": 4},
        "train": {"epochs": 1},
        "ray": {"cpus_per_trainer": 1, "num_cpus": args.cores},
    }


def grid_shape(size: int) -> tuple[int, int]:
    """(seeds, learning rates) whose product is `size`, as close to square as it divides:
    500 → (25, 20), 10,000 → (100, 100), 100,000 → (400, 250)."""
    lrs = max(d for d in range(1, math.isqrt(size) + 1) if size % d == 0)
    return size // lrs, lrs


def _learning_rates(count: int) -> list[float]:
    """`count` learning rates log-spaced over [LR_LOW, LR_HIGH], rounded so that YAML keeps
    them short."""
    return [float(f"{lr:.6g}") for lr in np.geomspace(LR_LOW, LR_HIGH, count)]


def _report(args: argparse.Namespace, load: str, runs: list[ScaleRun]) -> str:
    rows = []
    previous: dict[tuple[str, str], ScaleRun] = {}
    for run in runs:
        before = previous.get((run.storage, run.sampler))
        extra = (
            f"{1000 * (run.study - before.study) / (run.trials - before.trials):.1f}"
            if before
            else "-"
        )
        previous[(run.storage, run.sampler)] = run
        shape = " × ".join(str(n) for n in grid_shape(run.trials)) if run.sampler == "grid" else ""
        checks = []
        if run.ran != run.trials:
            checks.append(f"ran {run.ran}!")
        if run.rows != run.trials * WINDOWS:
            checks.append(f"{run.rows:,} rows!")
        if not run.resume_ok:
            checks.append("resume changed the journal!")
        rows.append(
            [
                run.storage,
                f"{run.sampler} {shape}".strip(),
                f"{run.trials:,}",
                f"{run.wall:.1f}",
                f"{run.study:.1f}",
                f"{run.ran / run.study:.0f}",
                extra,
                f"{1000 * run.driver_cpu / max(run.ran, 1):.1f}",
                f"{run.files:,}",
                f"{run.read:.2f}",
                f"{run.journal_bytes / 1e6:.1f}" if run.storage == "journal" else "-",
                f"{run.reopen:.2f}",
                "-" if run.resume is None else f"{run.resume:.1f}",
                " ".join(checks) or "ok",
            ]
        )
    lines = [
        f"### Scale: tiny trials ({WINDOWS} windows, 1 layer of 4), {args.cores} cores",
        "",
        "- wall s: the study's process, launch to exit; study s: `run_study`'s own clock; "
        "ms per extra trial: study s gained since the previous size, per trial",
        "- driver CPU: `StudyOutcome.driver_cpu_seconds` per trial (the driver process alone)",
        "- steps files: Parquet files under steps/; read s: `pd.read_parquet(OUTPUT/steps)`; "
        "reopen s: `optuna.load_study` + `get_trials` on the journal; resume s: "
        "`python -m pipeline study` rerun on the finished output (nothing left to run)",
        f"- overrides: {', '.join(f'`{s}`' for s in args.set) or 'none'}; {load}",
        "",
        *table(
            [
                "storage",
                "sampler",
                "trials",
                "wall s",
                "study s",
                "trials/s",
                "ms per extra trial",
                "driver CPU ms/trial",
                "steps files",
                "read s",
                "journal MB",
                "reopen s",
                "resume s",
                "checks",
            ],
            rows,
        ),
        "",
        *_storage_ratios(runs),
        GOALS,
    ]
    return "\n".join(lines)


def _storage_ratios(runs: list[ScaleRun]) -> list[str]:
    """A line per study measured on both storages: the database's wall time over the journal's
    (goal, issue 22: at most 2×)."""
    journal = {(r.sampler, r.trials): r for r in runs if r.storage == "journal"}
    lines = [
        f"- {r.sampler} {r.trials:,}: database {r.wall:.1f} s / journal "
        f"{journal[(r.sampler, r.trials)].wall:.1f} s wall = "
        f"{r.wall / journal[(r.sampler, r.trials)].wall:.2f}× (goal ≤ 2×); driver CPU "
        f"{1000 * r.driver_cpu / max(r.ran, 1):.1f} against "
        f"{1000 * journal[(r.sampler, r.trials)].driver_cpu / max(r.ran, 1):.1f} ms per trial"
        for r in runs
        if r.storage == "database" and (r.sampler, r.trials) in journal
    ]
    return [*lines, ""] if lines else []


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    main()
