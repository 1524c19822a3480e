"""A newcomer's first study, four ways, side by side in one run: is echo-study worth it cold?

The grid (issue 10): model.num_layers [1, 2, 3, 4] × model.state_size [4, 16] × task.echo_step
[3, 9, 15] × train.seed [0, 1] = 48 trials of 2 epochs (series 50,000, batch 5, truncation 15:
666 windows an epoch), lr 0.3, on `--cores` cores (default 2). Each way runs as a fresh Python
process and is timed from its launch to its exit, as a user waits for it:

1. the plain pool: `python bench/baseline.py`, a `multiprocessing.Pool(cores)` of one-thread
   processes over the straightforward loop (`nn.LSTM` + `nn.Linear` + Adagrad, the state
   detached every window), each trial writing its own Parquet file; the ratios are against it;
2. echo-study cold: `python -m pipeline study` with every compiled-kernel cache it may use
   (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR, NUMBA_CACHE_DIR) pointed at fresh empty
   folders: a fresh machine;
3. echo-study warm: the same command again right after, with the same cache folders;
4. Ray Tune + OptunaSearch over the same loop (`bench/tune_loop.py`), when `ray.tune` and
   `optuna` import here; otherwise the row says why it was skipped.

Every way's steps are read back and counted, so a run that trained less shows. The goals
(issue 10) are printed beside the figures, never asserted: cold ≥ 3× and warm ≥ 5× the pool.

    python bench/first_run.py            # the 48-trial grid: about 3-4 minutes on two cores
                                         # (pool ~30 s, ours ~5-10 s each, Tune ~115 s)
    python bench/first_run.py --quick    # 4 small trials, about a minute: checks the script,
                                         # its ratios mean little
    python bench/first_run.py --set train.compile=true   # any config key, for echo-study runs
    python bench/first_run.py --no-tune --keep           # skip Tune; keep the outputs
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harness import (
    ROOT,
    child_env,
    fresh_caches,
    run_child,
    run_study_cli,
    steps_rows,
    work_folder,
    write_config,
)
from report import machine, say, table, times

GRID = {
    "model.num_layers": [1, 2, 3, 4],
    "model.state_size": [4, 16],
    "task.echo_step": [3, 9, 15],
    "train.seed": [0, 1],
}
QUICK_GRID = {
    "model.num_layers": [1, 2],
    "model.state_size": [4, 16],
    "task.echo_step": [3],
    "train.seed": [0],
}
TASK = {"series_length": 50_000, "batch_size": 5, "truncation": 15}
QUICK_SERIES_LENGTH = 7_500  # 100 windows an epoch
TRAIN = {"epochs": 2, "lr": 0.3}
# The plain loop's TrialSpec field of each searched key.
SPEC_FIELDS = {
    "model.num_layers": "num_layers",
    "model.state_size": "state_size",
    "task.echo_step": "echo_step",
    "train.seed": "seed",
}
GOALS = {"cold": 3.0, "warm": 5.0}


@dataclass(frozen=True)
class Way:
    """One way of running the grid, measured; `note` says why it was skipped, when it was."""

    name: str
    seconds: float | None = None
    steps: int | None = None
    goal: float | None = None
    note: str = ""


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    grid = QUICK_GRID if args.quick else GRID
    task = {**TASK, "series_length": QUICK_SERIES_LENGTH} if args.quick else TASK
    trials = _count(grid)
    expected = trials * TRAIN["epochs"] * _windows_per_epoch(task)
    with work_folder("echo-first-run-", args.keep) as folder:
        say(f"{trials} trials, {expected:,} windows in all, on {args.cores} cores; in {folder}")
        load = machine()
        ways = _measure(args, grid, task, folder)
        print(_report(args, grid, task, trials, expected, load, ways))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2, help="pool processes and Ray CPUs")
    parser.add_argument("--quick", action="store_true", help="4 small trials: a smoke run")
    parser.add_argument("--no-tune", action="store_true", help="skip the Ray Tune row")
    parser.add_argument("--keep", action="store_true", help="keep the outputs and logs")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key of the echo-study runs, e.g. train.compile=true",
    )
    return parser


def _measure(args: argparse.Namespace, grid: dict, task: dict, folder: Path) -> list[Way]:
    spec_grid = folder / "grid.json"
    spec_grid.write_text(json.dumps(_spec_grid(grid, task)))
    config = write_config(folder / "first-run.yaml", _study_config(grid, task))
    overrides = [f"ray.num_cpus={args.cores}", *args.set]
    caches = fresh_caches(folder / "caches")

    say(f"the plain pool: multiprocessing.Pool({args.cores}) over the straightforward loop")
    pool = _timed_loop("baseline.py", spec_grid, args.cores, folder / "pool")
    ways = [Way(f"`multiprocessing.Pool({args.cores})`, plain loop", *pool)]
    for kind in ("cold", "warm"):
        say(f"echo-study, {kind} caches")
        output = folder / f"ours-{kind}"
        run = run_study_cli(config, output, folder / f"ours-{kind}.log", overrides, caches)
        ways.append(Way(f"echo-study, {kind} caches", run.seconds, steps_rows(output), GOALS[kind]))
    ways.append(_tune_way(args, spec_grid, folder))
    return ways


def _timed_loop(script: str, spec_grid: Path, cores: int, output: Path) -> tuple[float, int]:
    """Run a bench script over the grid in a fresh process; its wall time and steps written."""
    argv = [sys.executable, f"bench/{script}", str(spec_grid), "--processes", str(cores)]
    run = run_child([*argv, "--output", str(output)], output.with_suffix(".log"))
    return run.seconds, steps_rows(output)


def _tune_way(args: argparse.Namespace, spec_grid: Path, folder: Path) -> Way:
    name = "Ray Tune + OptunaSearch, plain loop"
    if args.no_tune:
        return Way(name, note="skipped (--no-tune)")
    missing = _tune_missing()
    if missing:
        return Way(name, note=f'skipped: {missing} (`pip install "ray[tune]==2.60.0"`)')
    say("Ray Tune + OptunaSearch over the straightforward loop")
    return Way(name, *_timed_loop("tune_loop.py", spec_grid, args.cores, folder / "tune"))


def _tune_missing() -> str | None:
    """Why Ray Tune with OptunaSearch cannot run here (the import error), or None."""
    check = "import optuna, ray.tune, ray.tune.search.optuna"
    done = subprocess.run(
        [sys.executable, "-c", check],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"`{check}` failed"


def _study_config(grid: dict, task: dict) -> dict:
    """The grid as a newcomer writes it for echo-study: defaults everywhere else."""
    return {
        "study": {"name": "first-run", "sampler": "grid", "pruner": "none", "search": grid},
        "task": task,
        "train": TRAIN,
        "ray": {"cpus_per_trainer": 1},
    }


def _spec_grid(grid: dict, task: dict) -> dict:
    """The same grid for the plain loop: TrialSpec fields, fixed and varied."""
    return {
        "fixed": {**task, **TRAIN},
        "axes": {SPEC_FIELDS[key]: values for key, values in grid.items()},
    }


def _count(grid: dict) -> int:
    return math.prod(len(values) for values in grid.values())


def _windows_per_epoch(task: dict) -> int:
    return task["series_length"] // task["batch_size"] // task["truncation"]


def _report(
    args: argparse.Namespace,
    grid: dict,
    task: dict,
    trials: int,
    expected: int,
    load: str,
    ways: list[Way],
) -> str:
    """Markdown: what ran, then each way's wall time and its ratio to the plain pool."""
    pool = ways[0].seconds
    rows = []
    for way in ways:
        if way.seconds is None:
            rows.append([way.name, "-", "-", "-", way.note])
            continue
        steps = f"{way.steps:,}" + ("" if way.steps == expected else f" (of {expected:,}!)")
        goal = f"≥ {way.goal:g}×" if way.goal else ""
        ratio = "1×" if way is ways[0] else times(pool / way.seconds)
        rows.append([way.name, f"{way.seconds:.1f}", steps, ratio, goal])
    axes = " × ".join(f"{key} {values}" for key, values in grid.items())
    windows = _windows_per_epoch(task)
    lines = [
        f"### First run: {trials} trials, four ways ({args.cores} cores)",
        "",
        f"- grid: {axes}; {TRAIN['epochs']} epochs × {windows} windows, lr {TRAIN['lr']}, "
        f"batch {task['batch_size']}, truncation {task['truncation']}",
        "- wall s: a fresh Python process from launch to exit (imports, Ray, training, "
        "Parquet, echo-study's summary); speed-up: the plain pool's wall s over the row's",
        "- cold: TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR and NUMBA_CACHE_DIR in fresh empty "
        "folders; warm: the same folders again right after; echo-study overrides: "
        + (", ".join(f"`{s}`" for s in [f"ray.num_cpus={args.cores}", *args.set])),
        f"- steps: rows read back from each way's Parquet files; {load}",
        "",
        *table(["way", "wall s", "steps", "speed-up", "goal (issue 10)"], rows),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
