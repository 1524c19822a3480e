"""How the capacity frontier moves with the training budget, read from one finished study.

A trial's data and initial weights depend on its seed and the epoch only (pipeline/training/
data.py), never on how many epochs it runs, so its first E epochs are those of a run of E
epochs: the frontier at a smaller budget can be read off the same trials, by cutting each at
E epochs. Prints the capacity table's frontier per (layers, state size) at each budget, and
whether two real runs agree where they overlap:

    python bench/capacity_budget.py results/capacity-20 --epochs 5 10 15 20
    python bench/capacity_budget.py results/capacity-20 --epochs 10 --compare results/capacity
"""

from __future__ import annotations

import argparse

import pandas as pd

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
    first, last = table.iloc[:, 0].fillna(0), table.iloc[:, -1].fillna(0)
    print(f"largest move from {args.epochs[0]} to {args.epochs[-1]} epochs: "
          f"{(last - first).abs().max():g} echo steps")  # fmt: skip
    if args.compare:
        real = frontier(args.compare).set_index(keys)["largest_echo_step"]
        same = real.fillna(0).equals(table.iloc[:, 0].fillna(0))
        print(f"cut at {args.epochs[0]} epochs equals the real run {args.compare}: {same}")


if __name__ == "__main__":
    main()
