"""The plain loop's grid run the way a Ray Tune user would: Tuner + OptunaSearch.

The same trials as `bench/baseline.py GRID.json` (the same loop, each trial writing its losses to
its own Parquet file), but Ray Tune schedules them and Optuna's GridSampler, behind Tune's
`OptunaSearch`, picks each trial's parameters. Tune's defaults otherwise: a function trainable
of one CPU, a fresh worker per trial (`reuse_actors=False`), results kept under the output. Ray
starts embedded with `--processes` CPUs and no dashboard, as the pipeline's does. Needs
`ray[tune]` (not a dependency of echo-study): `pip install "ray[tune]==2.60.0"`.

    python bench/tune_loop.py GRID.json --processes 2 --output DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

import optuna
import ray
from baseline import TrialSpec, grid_specs, init_worker, steps_frame, train_trial
from ray import tune
from ray.tune.search.optuna import OptunaSearch


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid, minus its call to study.stop() once the grid is used up, which raises
    outside study.optimize (where OptunaSearch tells its trials); Tune stops at num_samples."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def _trainable(fixed: dict[str, Any], folder: str):
    """A Tune function trainable: one trial of the plain loop, its steps written to Parquet."""

    def run(params: dict[str, Any]) -> None:
        init_worker()
        spec = TrialSpec(**fixed, **params)
        result = train_trial(spec)
        number = tune.get_context().get_trial_id()
        path = os.path.join(folder, f"trial-{number}.parquet")
        steps_frame(0, spec, result.losses).to_parquet(path, index=False)
        tune.report({"loss": float(result.losses[-spec.windows_per_epoch :].mean())})

    return run


def run_tune(grid: dict[str, Any], processes: int, output: str) -> int:
    """Run the grid under Tune with `processes` trials at a time; returns how many ended."""
    folder = os.path.abspath(os.path.join(output, "steps"))
    os.makedirs(folder, exist_ok=True)
    axes = grid["axes"]
    search = OptunaSearch(metric="loss", mode="min", sampler=_GridSampler(axes, seed=0), seed=0)
    tuner = tune.Tuner(
        tune.with_resources(_trainable(grid["fixed"], folder), {"cpu": 1}),
        param_space={name: tune.choice(values) for name, values in axes.items()},
        tune_config=tune.TuneConfig(
            search_alg=search,
            num_samples=len(grid_specs(grid)),
            max_concurrent_trials=processes,
        ),
        run_config=tune.RunConfig(
            storage_path=os.path.abspath(os.path.join(output, "tune")), verbose=0
        ),
    )
    return len(tuner.fit())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", help='JSON file: {"fixed": {...}, "axes": {...}}')
    parser.add_argument("--processes", type=int, default=2, help="trials at a time (default 2)")
    parser.add_argument("--output", required=True, help="folder for steps/ and Tune's results")
    args = parser.parse_args(argv)
    with open(args.grid) as file:
        grid = json.load(file)
    ray.init(num_cpus=args.processes, include_dashboard=False, logging_level=logging.WARNING)
    try:
        ended = run_tune(grid, args.processes, args.output)
    finally:
        ray.shutdown()
    print(json.dumps({"trials": ended}))


if __name__ == "__main__":
    main()
