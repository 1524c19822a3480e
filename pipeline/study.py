"""The Optuna study, its trials run as Ray tasks.

The driver (this process) owns the study: it alone asks for trials, tells their outcomes and
writes the results, so a journal file in the output folder needs no other writer. Trials of one
architecture are trained in lockstep by one Ray task (`study.trials_per_task` at most), and as
many tasks run at once as the cluster has CPUs for (`ray.cpus_per_trial` each). While they run,
tasks report each trial's running loss; the driver feeds it to Optuna's pruner and sends back
the verdicts, through a small relay actor. A finished trial's steps are written (atomically)
before Optuna hears of it, so a driver killed at any moment leaves nothing half-done: the next
run completes trials whose steps were written and queues the rest again.

This is the only module that imports Ray or Optuna.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import math
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import ray
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from tqdm import tqdm

from pipeline.config import Config, ConfigError, SearchParam, short_name
from pipeline.data import derive_seed
from pipeline.results import (
    FIXED_COLUMNS,
    TRIALS,
    Output,
    check_output,
    claim_output,
    read_steps_outcomes,
    steps_file,
    steps_table,
    trial_row,
    trials_table,
)
from pipeline.summary import objective_value, trial_metrics, write_summary
from pipeline.train import Step, batch_key, first_line, train

log = logging.getLogger(__name__)

JOURNAL = "study.journal"
LOCK = ".study.lock"
STATES = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED}


@dataclass(frozen=True)
class StudyOutcome:
    """What a `run_study` call achieved."""

    counts: dict[str, int]
    """Finished trials of the study by state (COMPLETE, PRUNED, FAIL), this run and earlier."""
    ran: int
    """Trials finished by this run."""
    best_value: float | None
    best_params: dict[str, Any] | None
    seconds: float
    driver_cpu_seconds: float
    """CPU time this process (the driver) spent, Ray's own processes not included."""


@dataclass(frozen=True)
class PlannedTrial:
    """A trial asked of Optuna, with everything its Ray task needs."""

    number: int
    config: Config
    """The study's config with the trial's parameters and its own seed in train.seed."""
    columns: dict[str, Any]
    """Its parameter columns in Parquet, by short name."""


@dataclass(frozen=True)
class TrialOutcome:
    """What a Ray task returns for each of its trials."""

    number: int
    losses: np.ndarray
    status: str
    """complete, pruned, diverged or error."""
    error: str | None
    seconds: float


def run_study(
    config: Config, address: str | None = None, progress: bool | None = None
) -> StudyOutcome:
    """Run (or resume) the study of `config` until it has `study.n_trials` finished trials.

    `address` (else ray.address, else RAY_ADDRESS) names a Ray cluster to join; without one Ray
    starts embedded, unless this process already runs Ray. `progress`: a bar (True), a line per
    finished trial (False), or a bar on a terminal only (None). Bad input raises ConfigError
    before anything is written.
    """
    started, started_cpu = time.perf_counter(), time.process_time()
    output = Output(config.output)
    _check_search(config)
    _check_output_location(config, output)
    check_output(output, config)
    _check_not_running(output)
    custom_storage = _open_storage(config.study.storage) if config.study.storage else None
    embedded = _connect_ray(config, address or config.ray.address or os.environ.get("RAY_ADDRESS"))
    try:
        with _exclusive(output):
            claim_output(output, config)
            storage = custom_storage or _open_storage(output.path(JOURNAL))
            study = optuna.create_study(
                storage=storage,
                study_name=config.study.name,
                sampler=_sampler(config),
                pruner=_pruner(config),
                direction="minimize",
                load_if_exists=True,
            )
            driver = _Driver(config, output, study, progress)
            driver.recover()
            ran = driver.run()
            if driver.rows:
                write_summary(config.output)
    finally:
        if embedded:
            ray.shutdown()
    best = _best(study)
    return StudyOutcome(
        counts=dict(Counter(row["state"] for row in driver.rows.values())),
        ran=ran,
        best_value=best.value if best else None,
        best_params=best.params if best else None,
        seconds=time.perf_counter() - started,
        driver_cpu_seconds=time.process_time() - started_cpu,
    )


def param_columns(config: Config) -> list[str]:
    """The parameter columns of a study's Parquet files, in order."""
    searched = [p.short_name for p in config.study.search if p.short_name not in FIXED_COLUMNS]
    return [*FIXED_COLUMNS, *searched]


class _Driver:
    """The study's one loop: ask trials, batch them onto Ray, relay pruning, record outcomes."""

    def __init__(self, config: Config, output: Output, study: optuna.Study, progress: bool | None):
        self.config = config
        self.output = output
        self.study = study
        self.columns = param_columns(config)
        self.rows: dict[int, dict[str, Any]] = {}
        self.queue: list[PlannedTrial] = []
        self.trials: dict[int, optuna.Trial] = {}
        self.last_report: dict[int, float] = {}
        self.last_step: dict[int, int] = {}
        self.running: dict[ray.ObjectRef, list[PlannedTrial]] = {}
        self.slots = max(1, int(ray.cluster_resources().get("CPU", 1) // config.ray.cpus_per_trial))
        self.relay = _PruningRelay.remote() if config.study.pruner != "none" else None
        self.progress = _Progress(config.study.n_trials, progress)

    def recover(self) -> None:
        """Pick up what earlier runs left. A trial a dead driver left RUNNING is finished from
        its steps file when that was written; else it is marked FAIL and its parameters are
        queued again, so that a grid still ends complete."""
        outcomes = read_steps_outcomes(self.output)
        for frozen in self.study.get_trials(deepcopy=False):
            outcome = outcomes.get(frozen.number)
            if frozen.state == TrialState.RUNNING and outcome is not None:
                self.study.tell(
                    frozen.number, _told_value(outcome), state=TrialState[outcome["state"]]
                )
            elif frozen.state == TrialState.RUNNING:
                self.study.tell(frozen.number, state=TrialState.FAIL)
                self.study.enqueue_trial(frozen.params)
                log.warning(
                    "trial %d was left running by a stopped study; queued again", frozen.number
                )
                continue
            if outcome is not None:
                self.rows[frozen.number] = outcome
        self.progress.start(self.rows.values())
        self._write_trials()

    def run(self) -> int:
        """Run trials until the study has its count of finished trials; returns how many ran."""
        before = len(self.rows)
        reports = self.relay.next_reports.remote() if self.relay else None
        try:
            while True:
                self._submit()
                if not self.running:
                    break
                waiting = [*self.running, *([reports] if reports else [])]
                ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
                self.progress.tick()
                for ref in ready:
                    if ref is reports:
                        self._judge(ray.get(ref))
                        reports = self.relay.next_reports.remote()
                    else:
                        self._finish(ref)
        finally:
            self.progress.close()
            if self.relay:
                ray.kill(self.relay)
        return len(self.rows) - before

    def _remaining(self) -> int:
        """Trials still to ask for. Finished trials are those with steps files: a trial that
        was interrupted and queued again does not count."""
        in_flight = len(self.queue) + sum(len(b) for b in self.running.values())
        return self.config.study.n_trials - len(self.rows) - in_flight

    def _submit(self) -> None:
        while len(self.running) < self.slots:
            self._ask(self._remaining())
            batch = _take_batch(
                self.queue, self.slots - len(self.running), self.config.study.trials_per_task
            )
            if not batch:
                return
            task = run_batch.options(
                num_cpus=self.config.ray.cpus_per_trial, max_retries=self.config.ray.max_retries
            )
            ref = task.remote(
                [(t.number, t.config) for t in batch],
                self.config.study.report_every,
                self.config.ray.cpus_per_trial,
                self.relay,
            )
            self.running[ref] = batch

    def _ask(self, count: int) -> None:
        """Ask Optuna for up to `count` more trials. A grid or random search gains nothing by
        waiting, so all are asked at once (big batches); TPE only as many as free slots take."""
        if self.config.study.sampler == "tpe":
            free = self.slots - len(self.running)
            count = min(count, free * self.config.study.trials_per_task - len(self.queue))
        for _ in range(max(0, count)):
            trial = self.study.ask()
            params = {p.key: _suggest(trial, p) for p in self.config.study.search}
            trial_config = self.config.with_params(params)
            seed = derive_seed(self.config.study.seed, trial.number, trial_config.train.seed)
            columns = {name: trial_config.value(key) for name, key in FIXED_COLUMNS.items()}
            columns.update({short_name(k): v for k, v in params.items()})
            planned = PlannedTrial(
                trial.number, trial_config.with_params({"train.seed": seed}), columns
            )
            self.trials[trial.number] = trial
            self.queue.append(planned)

    def _judge(self, tickets: list[tuple[int, list[tuple[int, int, float]]]]) -> None:
        """Report running losses to Optuna and relay which trials its pruner stops."""
        verdicts = {}
        for ticket, reports in tickets:
            pruned = []
            for number, step, value in reports:
                trial = self.trials[number]
                # A task Ray reran after its worker died reports its first steps again.
                if step > self.last_step.get(number, -1):
                    trial.report(value, step)
                    self.last_step[number], self.last_report[number] = step, value
                if trial.should_prune():
                    pruned.append(number)
            verdicts[ticket] = pruned
        self.relay.decide.remote(verdicts)

    def _finish(self, ref: ray.ObjectRef) -> None:
        batch = self.running.pop(ref)
        try:
            outcomes = ray.get(ref)
        except (ray.exceptions.RayError, OSError) as error:
            # The task's worker died more often than ray.max_retries allows.
            text = f"{type(error).__name__}: {first_line(error)}"
            outcomes = [
                TrialOutcome(t.number, np.zeros(0, np.float32), "error", text, 0.0) for t in batch
            ]
        planned = {t.number: t for t in batch}
        for outcome in outcomes:
            self._record(planned[outcome.number], outcome)
        self._write_trials()

    def _record(self, trial: PlannedTrial, outcome: TrialOutcome) -> None:
        """Write the trial's steps, then tell Optuna: a crash in between is recovered later."""
        config = trial.config
        metrics = trial_metrics(outcome.losses, config.task.windows_per_epoch, config.convergence)
        state = STATES.get(outcome.status, TrialState.FAIL)
        value = None
        if state == TrialState.COMPLETE:
            value = objective_value(metrics, config.study.objective)
        elif state == TrialState.PRUNED:
            # What Optuna records for a pruned trial: its last reported value.
            value = self.last_report.pop(trial.number, None)
        error = outcome.error
        if outcome.status == "diverged":
            error = f"diverged at step {len(outcome.losses) - 1}"
        row = trial_row(
            trial=trial.number,
            status=outcome.status,
            params=trial.columns,
            value=value,
            metrics=metrics,
            steps=len(outcome.losses),
            duration_s=outcome.seconds,
            error=error,
            trial_seed=config.train.seed,
        )
        windows = config.task.windows_per_epoch
        table = steps_table(trial.number, outcome.losses, windows, trial.columns, row)
        self.output.write_table(steps_file(trial.number), table)
        optuna_trial = self.trials.pop(trial.number)
        for key in ("final_loss", "steps_to_converge", "trial_seed", "error"):
            if row[key] is not None and not (isinstance(row[key], float) and math.isnan(row[key])):
                optuna_trial.set_user_attr(key, row[key])
        self.study.tell(optuna_trial, _told_value(row), state=state)
        self.rows[trial.number] = row
        self.progress.record(row, self.columns)

    def _write_trials(self) -> None:
        rows = [self.rows[n] for n in sorted(self.rows)]
        self.output.write_table(TRIALS, trials_table(rows, self.columns))


def _take_batch(
    queue: list[PlannedTrial], free_slots: int, trials_per_task: int
) -> list[PlannedTrial]:
    """Take the next batch off the queue: trials of one architecture, the costliest group first
    (deep networks of many trials) so that no worker is left with a long task at the end, and
    split so that every free slot gets work when there are fewer architectures than slots."""
    if not queue or free_slots < 1:
        return []
    groups: dict[tuple, list[PlannedTrial]] = {}
    for trial in queue:
        groups.setdefault(batch_key(trial.config), []).append(trial)
    costliest = max(groups.values(), key=lambda g: (len(g) * g[0].config.model.num_layers, len(g)))
    share = math.ceil(len(costliest) / max(1, free_slots - len(groups) + 1))
    batch = costliest[: min(share, trials_per_task)]
    taken = {t.number for t in batch}
    queue[:] = [t for t in queue if t.number not in taken]
    return batch


@ray.remote
def run_batch(
    trials: list[tuple[int, Config]], report_every: int, cpus: int, relay: Any
) -> list[TrialOutcome]:
    """Train a batch of trials of one architecture in lockstep, on one Ray worker."""
    # Ray sets OMP_NUM_THREADS per task, but torch read it when the worker started.
    torch.set_num_threads(cpus)
    numbers = [number for number, _ in trials]
    total_steps = trials[0][1].total_steps
    on_step = None
    if relay is not None:
        on_step = _pruning_callback(numbers, report_every, total_steps, relay)
    try:
        result = train([config for _, config in trials], on_step)
    except Exception as error:  # a trial that raises is recorded FAIL; the study goes on
        text = f"{type(error).__name__}: {first_line(error)}"
        return [TrialOutcome(n, np.zeros(0, np.float32), "error", text, 0.0) for n in numbers]
    seconds = result.seconds / len(trials)
    return [
        TrialOutcome(number, run.losses, run.status, None, seconds)
        for number, run in zip(numbers, result.runs, strict=True)
    ]


def _pruning_callback(numbers: list[int], report_every: int, total_steps: int, relay: Any):
    """Every `report_every` steps, send each running trial's mean loss over those steps to the
    driver and stop the trials its pruner rejects. A trial at its last step has finished, so
    it is not judged any more."""
    totals = np.zeros(len(numbers))
    stopped: set[int] = set()

    def on_step(step: Step) -> list[int]:
        losses = step.losses
        totals[:] += np.nan_to_num(losses, nan=0.0, posinf=1e30)
        if (step.step + 1) % report_every or step.step + 1 == total_steps:
            return []
        reports = [
            (numbers[k], step.step, float(totals[k] / report_every))
            for k in range(len(numbers))
            if k not in stopped and np.isfinite(losses[k])
        ]
        totals[:] = 0.0
        pruned = set(ray.get(relay.report.remote(reports))) if reports else set()
        stop = [k for k, number in enumerate(numbers) if number in pruned]
        stopped.update(stop)
        return stop

    return on_step


@ray.remote(num_cpus=0)
class _PruningRelay:
    """Carries running losses from trials to the driver, and its verdicts back; async, so a
    task waiting for its verdict never blocks another task's report."""

    def __init__(self) -> None:
        self._pending: list[tuple[list, asyncio.Future]] = []
        self._arrived = asyncio.Event()
        self._waiting: dict[int, asyncio.Future] = {}
        self._tickets = 0

    async def report(self, reports: list[tuple[int, int, float]]) -> list[int]:
        """Called by a task: (trial, step, value) triples; returns the trials to stop."""
        verdict = asyncio.get_running_loop().create_future()
        self._pending.append((reports, verdict))
        self._arrived.set()
        return await verdict

    async def next_reports(self) -> list[tuple[int, list]]:
        """Called by the driver: waits for reports, returns them with tickets to decide."""
        await self._arrived.wait()
        self._arrived.clear()
        pending, self._pending = self._pending, []
        tickets = []
        for reports, verdict in pending:
            self._tickets += 1
            self._waiting[self._tickets] = verdict
            tickets.append((self._tickets, reports))
        return tickets

    async def decide(self, verdicts: dict[int, list[int]]) -> None:
        for ticket, pruned in verdicts.items():
            self._waiting.pop(ticket).set_result(pruned)


class _Progress:
    """A bar on a terminal (done / pruned / failed, best value); otherwise a line per trial."""

    def __init__(self, total: int, bar: bool | None) -> None:
        self.total = total
        self.counts: Counter[str] = Counter()
        self.best: float | None = None
        use_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = tqdm(total=total, unit="trial", disable=not use_bar, dynamic_ncols=True)

    def start(self, rows) -> None:
        for row in rows:
            self._count(row)
        self.bar.update(sum(self.counts.values()))
        self._postfix()

    def record(self, row: dict[str, Any], columns: list[str]) -> None:
        self._count(row)
        if self.bar.disable:
            params = ", ".join(f"{c}={row[c]}" for c in columns)
            value = "" if row["value"] is None else f" value={row['value']:.4g}"
            error = f" ({row['error']})" if row["error"] else ""
            print(
                f"trial {row['trial']} {row['state']}{value} [{params}] "
                f"{sum(self.counts.values())}/{self.total}{error}",
                flush=True,
            )
        else:
            self.bar.update()
            self._postfix()

    def tick(self) -> None:
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def _count(self, row: dict[str, Any]) -> None:
        self.counts[row["state"]] += 1
        if row["state"] == "COMPLETE" and row["value"] is not None:
            self.best = row["value"] if self.best is None else min(self.best, row["value"])

    def _postfix(self) -> None:
        best = "-" if self.best is None else f"{self.best:.4g}"
        self.bar.set_postfix_str(
            f"done {self.counts['COMPLETE']} pruned {self.counts['PRUNED']} "
            f"failed {self.counts['FAIL']} best {best}"
        )


def _told_value(outcome: dict[str, Any]) -> float | None:
    """Optuna takes a value only with COMPLETE; a pruned trial gets its last reported one."""
    return outcome["value"] if outcome["state"] == "COMPLETE" else None


def _suggest(trial: optuna.Trial, param: SearchParam) -> Any:
    name = param.short_name
    if param.choices is not None:
        return trial.suggest_categorical(name, list(param.choices))
    if isinstance(param.low, int) and isinstance(param.high, int):
        return trial.suggest_int(
            name, param.low, param.high, step=int(param.step or 1), log=param.log
        )
    return trial.suggest_float(name, param.low, param.high, step=param.step, log=param.log)


def _sampler(config: Config) -> optuna.samplers.BaseSampler:
    study = config.study
    if study.sampler == "grid":
        space = {p.short_name: list(p.choices) for p in study.search}
        return _GridSampler(space, seed=study.seed)
    if study.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=study.seed)
    return optuna.samplers.RandomSampler(seed=study.seed)


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid, minus its habit of calling study.stop() once the grid is exhausted, which
    only works inside study.optimize; the driver stops at study.trials by itself."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def _pruner(config: Config) -> optuna.pruners.BasePruner:
    # The loss sits near ln 2 for hundreds of windows before a model finds the echo, so no
    # trial is judged during its first epoch.
    epoch = config.task.windows_per_epoch
    if config.study.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=epoch)
    if config.study.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=epoch, max_resource=config.total_steps)
    return optuna.pruners.NopPruner()


def _check_search(config: Config) -> None:
    if not config.study.search:
        raise ConfigError(
            "study.search is empty: list at least one key to vary, e.g. task.echo_step: [3, 15]"
        )


def _check_output_location(config: Config, output: Output) -> None:
    if (
        os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
        and "://" not in config.output
        and (not os.path.isabs(config.output))
    ):
        raise ConfigError(
            f"output {config.output!r} is relative, but this runs as a Ray job, in a temporary "
            "copy of the working directory that is deleted afterwards: give an absolute path "
            "(--output /data/echo-grid) or a URI (s3://bucket/echo-grid)"
        )
    if not output.is_local and config.study.storage is None:
        raise ConfigError(
            f"output {config.output!r} is not a local folder, where the default journal file "
            "cannot live: set study.storage to an Optuna storage URL (e.g. postgresql://...)"
        )


def _open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage: a database URL, or a path to a journal file."""
    try:
        if "://" not in url:
            return JournalStorage(JournalFileBackend(url))
        return optuna.storages.get_storage(url)
    except Exception as error:  # whatever the backend raises, the URL is what the user fixes
        raise ConfigError(
            f"study.storage = {url!r}: cannot be opened ({first_line(error)})"
        ) from None


def _connect_ray(config: Config, address: str | None) -> bool:
    """Join the cluster at `address`, or start Ray embedded; True when embedded. A Ray this
    process already runs is used as it is."""
    if address is not None:
        _check_reachable(address)
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(
            address="local",  # a Ray of our own, even when `ray start` runs on this machine
            num_cpus=config.ray.num_cpus,
            include_dashboard=config.ray.dashboard,
            dashboard_host="127.0.0.1",
            configure_logging=True,
            logging_level=logging.WARNING,
        )
        return True
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConfigError(_no_cluster(address, first_line(error))) from None
    return False


def _check_reachable(address: str) -> None:
    """Fail fast, and say how to start a cluster, when nothing listens at the address (Ray
    itself would retry for minutes)."""
    target = address
    if address == "auto":
        # What Ray would join: the cluster last started on this machine (a private helper of
        # Ray's, so without it Ray's own search decides).
        try:
            target = ray._private.services.canonicalize_bootstrap_address("auto")
        except ConnectionError as error:
            raise ConfigError(_no_cluster(address, first_line(error))) from None
        except (AttributeError, TypeError):
            return
    host, colon, port = target.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit() or "/" in host:
        raise ConfigError(
            f"ray.address = {address!r}: expected auto, host:port or ray://host:port "
            "(the GCS address that `ray start --head` prints, not the dashboard's http:// URL)"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return
    except OSError as error:
        raise ConfigError(_no_cluster(address, f"{target}: {first_line(error)}")) from None


def _no_cluster(address: str, reason: str) -> str:
    return (
        f"ray.address = {address!r}: no Ray cluster answers there ({reason}); start one with "
        "`ray start --head`, or leave ray.address unset to run Ray embedded"
    )


def _check_not_running(output: Output) -> None:
    """Refuse at once, before starting anything, an output another study is running into."""
    if not output.is_local or not output.exists(LOCK):
        return
    with open(output.path(LOCK)) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(_in_use(output)) from None
        fcntl.flock(lock, fcntl.LOCK_UN)


def _in_use(output: Output) -> str:
    return (
        f"output {output.location} is in use by another running study; wait for it to finish "
        "or choose another --output"
    )


@contextmanager
def _exclusive(output: Output) -> Iterator[None]:
    """Hold the output for this study alone: a second study into it is refused, not mixed in.
    The lock dies with the process, so a killed driver never leaves it behind."""
    if not output.is_local:
        yield
        return
    os.makedirs(output.root, exist_ok=True)
    with open(output.path(LOCK), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(_in_use(output)) from None
        yield


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None
