"""How the capacity frontier moves with the training budget, read from one finished study.

A trial's data and initial weights depend on its seed and the epoch only (pipeline/training/
data.py), never on how many epochs it runs, so its first E epochs are those of a run of E
epochs: the frontier at a smaller budget can be read off the same trials, by cutting each at
E epochs. Prints the capacity table's frontier per (layers, state size) at each budget, and
whether two real runs agree where they overlap:

    python bench/capacity_budget.py results/capacity-20 --epochs 5 10 15 20
    python bench/capacity_budget.py results/capacity-80 --epochs 20 40 80 --compare results/capacity
"""

from __future__ import annotations

import argparse

import pandas as pd

from pipeline.config import short_name
from pipeline.results.output import Output, read_config
from pipeline.summary.write import finished_trials, summarize


def cut(trials: pd.DataFrame, steps: int) -> pd.DataFrame:
    """The trials as a run of `steps` steps would have finished them: converged only where the
    first step below the threshold came before the cut (it depends on earlier losses only)."""
    reached = trials["steps_to_converge"].notna() & (trials["steps_to_converge"] < steps)
    return trials.assign(
        steps=trials["steps"].clip(upper=steps),
        converged=reached,
        steps_to_converge=trials["steps_to_converge"].where(reached),
    )


def frontier(output: str, epochs: int | None = None) -> pd.DataFrame:
    """The capacity table of a finished study, cut at `epochs` (default: as it ran)."""
    location = Output(output)
    config, trials = read_config(location), finished_trials(location)
    if epochs is not None:
        config = config.with_params({"train.epochs": epochs})
        trials = cut(trials, epochs * config.task.windows_per_epoch)
    return summarize(config, trials).capacity


def agreeing_trials(longer: str, shorter: str) -> tuple[int, int]:
    """Of the grid points both finished studies ran, how many converge at the same step (or
    not at all) within the shorter one's budget when the longer one is cut to it: the check
    that a cut run is the run of fewer epochs."""
    short_config = read_config(Output(shorter))
    steps = short_config.train.epochs * short_config.task.windows_per_epoch
    keys = [short_name(p.key) for p in short_config.study.search]
    cut_long = cut(finished_trials(Output(longer)), steps).set_index(keys)
    short = finished_trials(Output(shorter)).set_index(keys)
    shared = cut_long.index.intersection(short.index)
    agree = (
        cut_long.loc[shared, "steps_to_converge"].fillna(-1)
        == short.loc[shared, "steps_to_converge"].fillna(-1)
    ).sum()
    return int(agree), len(shared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="a finished capacity study's folder")
    parser.add_argument("--epochs", type=int, nargs="+", required=True)
    parser.add_argument("--compare", help="a real run of the first --epochs to check the cut")
    args = parser.parse_args()
    keys = ["num_layers", "state_size"]
    table = None
    for epochs in args.epochs:
        reached = frontier(args.output, epochs).set_index(keys)["largest_echo_step"]
        table = (
            reached.rename(f"{epochs} epochs").to_frame()
            if table is None
            else table.join(reached.rename(f"{epochs} epochs"))
        )
    print(table.to_string())
    # A network whose frontier lies below the grid's echo steps reads 0 (none learned).
    reached = table.fillna(0)
    for before, after in zip(reached.columns, reached.columns[1:], strict=False):
        moved = (reached[after] - reached[before]).abs()
        print(f"{before} to {after}: the frontier moved by at most {moved.max():g} echo steps "
              f"({(moved > 0).sum()} of {len(moved)} networks moved)")  # fmt: skip
    if args.compare:
        agree, shared = agreeing_trials(args.output, args.compare)
        print(
            f"trials both runs ran: {shared}; steps to converge within {args.compare}'s "
            f"budget agree for {agree} of them"
        )


if __name__ == "__main__":
    main()
