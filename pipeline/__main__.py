"""Command line: `python -m pipeline train|study|summarize ...`.

Bad input (a config, an override, a path) ends with one line on stderr and exit code 2, before
anything is written.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from pipeline.config import Config, ConfigError, load_config
from pipeline.study.launch import prepare

if TYPE_CHECKING:
    from tqdm import tqdm

    from pipeline.training.train import Step

# Each command imports what it needs when it runs (pandas, Optuna, Ray, torch: seconds in all),
# so that a study starts compiling a cold machine's kernels first (compile_ahead.py).

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command is run_summarize:  # takes an output folder, not a config
            return run_summarize(args)
        config = load_config(args.config, args.set)
        if args.output is not None:
            config = config.with_params({"output": args.output})
        if getattr(args, "address", None) is not None:
            config = config.with_params({"ray.address": args.address})
        return args.command(config, args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND", parser_class=_Parser)

    train_parser = commands.add_parser("train", help="train one model, as the tutorial does")
    _add_config_arguments(train_parser, example="configs/tutorial.yaml")
    train_parser.set_defaults(command=run_train)

    study_parser = commands.add_parser("study", help="run or resume an Optuna study on Ray")
    _add_config_arguments(study_parser, example="configs/quick.yaml")
    study_parser.add_argument(
        "--address",
        help="Ray cluster to join (default: ray.address, else RAY_ADDRESS, else Ray embedded)",
    )
    study_parser.set_defaults(command=run_study_command)

    summarize_parser = commands.add_parser(
        "summarize", help="summarize convergence versus layers, state size and echo step"
    )
    summarize_parser.add_argument(
        "output", help="a study's or train run's results folder or URI, e.g. results/quick"
    )
    summarize_parser.set_defaults(command=run_summarize)
    return parser


def _add_config_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("config", help=f"YAML config, e.g. {example}")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set model.num_layers=2 (repeatable)",
    )
    parser.add_argument("--output", help="results folder or URI (default: the config's output)")


def run_study_command(config: Config, args: argparse.Namespace) -> int:
    """Run or resume the study, then say where its results are."""
    # Before the imports below, most of a second: a cold machine's kernels compile beside them.
    launch = prepare(config)
    from pipeline.study.driver import run_study  # imports Ray, so only after the line above

    outcome = run_study(config, launch=launch)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(outcome.counts.items()))
    phases = outcome.phases
    print(
        f"Study {config.study.name}: {outcome.ran} trials ran in {outcome.seconds:.1f} s "
        f"({counts} in all): set-up {phases.setup:.1f} s, trials {phases.trials:.1f} s, "
        f"summary {phases.summary:.1f} s."
    )
    if outcome.best_value is not None:
        print(f"Best value {outcome.best_value:.4g} with {outcome.best_params}")
    print(f"Results in {config.output}")
    return 0


def run_summarize(args: argparse.Namespace) -> int:
    """Write the summary of the finished trials in an output, then print its findings."""
    from pipeline.summary.write import write_summary

    summary = write_summary(args.output)
    for sentence in summary.findings:
        print(f"- {sentence}")
    where = args.output.rstrip("/")
    tables = ", ".join(name for name in summary.files if not name.startswith("plots/"))
    plots = ", ".join(
        name.removeprefix("plots/") for name in summary.files if name.startswith("plots/")
    )
    print(f"Summary in {where}/: {tables}; plots in {where}/plots/: {plots}")
    return 0


def run_train(config: Config, args: argparse.Namespace) -> int:
    """Train one model like the tutorial and write it in the results layout as trial 0."""
    # Here, not at the top: the study and summarize commands never train, and torch (which
    # train imports) takes most of a second to import, matplotlib (plots) a quarter.
    from tqdm import tqdm

    from pipeline.results.metrics import trial_metrics
    from pipeline.results.output import TRIALS, Output, claim_output
    from pipeline.results.record import TrialResult, record_trials
    from pipeline.results.tables import FIXED_COLUMNS, trials_table
    from pipeline.summary.plots import png_bytes, training_figure
    from pipeline.training.device import resolve_device
    from pipeline.training.train import train

    resolve_device(config.train.device)
    # A study config's search space says nothing about this one run: keeping it would make
    # the output look like a study of which one trial ran.
    config = config.with_params({"study.search": {}})
    output = Output(config.output)
    output.check_writable()
    claim_output(output, config)
    with tqdm(total=config.total_steps, unit="window", disable=not sys.stderr.isatty()) as bar:
        result = train([config], on_step=_tutorial_log(config, bar))
    run = result.runs[0]
    params = {name: config.value(key) for name, key in FIXED_COLUMNS.items()}
    trial = TrialResult(0, config, params, run.losses, run.status, seconds=result.seconds)
    (row,) = record_trials(output, [trial], replace=True)
    output.write_table(TRIALS, trials_table([row], list(params)))
    x, y, margin = (a[..., 0] for a in result.last_window)
    title = (
        f"{config.model.num_layers} layers × {config.model.state_size} units, "
        f"echo {config.task.echo_step}, seed {config.train.seed}"
    )
    figure = training_figure(run.losses, x, y, margin, title)
    output.write_bytes("plots/training.png", png_bytes(figure))
    metrics = trial_metrics(run.losses, config.task.windows_per_epoch, config.convergence)
    _print_outcome(config, result.seconds, metrics, row["error"])
    return 0


def _tutorial_log(config: Config, bar: tqdm):
    """Print what the tutorial prints: each epoch's start, and the loss every log_every steps."""

    def on_step(step: Step) -> None:
        if step.window == 0:
            bar.write(f"New data, epoch {step.epoch}")
        if step.window % config.train.log_every == 0:
            bar.write(f"Step {step.window} Batch loss {step.losses[0]:.8g}")
        bar.update()

    return on_step


def _print_outcome(config: Config, seconds: float, metrics, error: str | None) -> None:
    epochs = config.train.epochs
    converged = (
        f"the {config.convergence.window}-step mean loss fell below "
        f"{config.convergence.threshold:g} at step {metrics.steps_to_converge}"
        if metrics.converged
        else f"the {config.convergence.window}-step mean loss never fell below "
        f"{config.convergence.threshold:g}"
    )
    print(
        f"Trained {epochs} epochs in {seconds:.1f} s ({seconds / epochs:.2f} s per epoch); "
        f"final loss {metrics.final_loss:.3g}; {converged}."
    )
    if error:
        print(f"The loss {error}.")
    print(f"Results in {config.output}")


def _exit_now(code: int) -> NoReturn:
    """Exit once every result is written: run the exit handlers and flush, then skip the
    interpreter's teardown of torch's, Ray's and numba's modules, about a second of a short
    study's wall time that no user waits for gladly."""
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
