"""The Optuna study, its trials flowing through long-lived trainers on Ray.

The driver (this process) owns the study: it alone asks for trials, tells their outcomes and
writes the results, so a journal file in the output folder needs no other writer. Trials run in
trainers, one Ray actor per `ray.cpus_per_trainer` CPUs, each holding lanes (see lanes.py): a lane
whose trial ends takes the next one at its next window. The driver asks Optuna for a trial only
when a lane can take it, so an adaptive sampler (TPE) samples each trial knowing every trial
finished so far; it relays the running losses that trainers report to Optuna's pruner and the
verdicts back, and records each trial as it ends: its steps are written (atomically, together
with the trials that ended with it) before Optuna is told, so a driver killed at any moment
leaves nothing half-done. Rerun, it tells Optuna about trials whose steps were written, marks
the trials it left running FAIL, and runs what is missing: a grid point is identified by its
parameters and its seed derives from them, so it gets the same losses however often the study
was interrupted. A trainer lost with its worker or node has its unfinished trials run again
elsewhere, up to `ray.max_retries` times.

The trainer actor lives in trainer.py, which every Ray worker running one imports: this module
is the driver's, the only one that imports Optuna.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import optuna
import ray
from optuna.trial import TrialState

from pipeline.config import Config, ConfigError, first_line
from pipeline.results.failpoints import failpoint
from pipeline.results.output import TRIALS, Output, check_output, claim_output
from pipeline.results.record import TrialResult, record_trials
from pipeline.results.tables import param_columns, read_steps_outcomes, trials_table
from pipeline.study.asking import Asker
from pipeline.study.launch import Launch, import_in_background, prepare
from pipeline.study.locations import check_output_location
from pipeline.study.optuna_setup import (
    JOURNAL,
    bind_output,
    check_output_bound,
    check_storage_knows,
    grouping,
    judge_attempt,
    make_pruner,
    make_sampler,
    open_storage,
    told_value,
)
from pipeline.study.placement import TrialWork, place_run
from pipeline.study.progress import Progress
from pipeline.study.ray_connection import (
    check_placement,
    connect_ray,
    describe_asks,
    stop_embedded_ray,
    stop_in_background,
    trainers_that_fit,
)
from pipeline.study.records import Phases, PlannedTrial, StudyOutcome, TrainerRecord
from pipeline.study.trainer import start_trainer
from pipeline.summary.write import write_summary
from pipeline.training.trial import Finished, LaneTrial, Report, lanes_key

log = logging.getLogger(__name__)

# Lanes per trainer when the config leaves it open: many for samplers that gain nothing from
# waiting (grid, random), few for TPE, which learns from every trial finished before it asks.
DEFAULT_LANES = {"grid": 64, "random": 64, "tpe": 8}
# Finished trials are recorded in groups, so that result files do not grow one per trial: at
# most one group a second (the first trial to finish is recorded at once), or sooner once
# this many wait.
RECORD_EVERY_TRIALS = 512
RECORD_EVERY_SECONDS = 1.0
# trials.parquet is rewritten at most this often while a study runs (and once at its end);
# the steps files' footers hold every row meanwhile.
TRIALS_TABLE_EVERY_SECONDS = 10.0
# A trainer that Ray has not placed this long after it was started says what it waits for
# (or sooner, at half of ray.placement_timeout_s).
WAIT_NOTICE_SECONDS = 10.0
# How long a trainer holds a call when it has nothing to tell yet.
EXCHANGE_WAIT_SECONDS = 0.5


class NoTrainerCanTrain(ConfigError):
    """Every trainer started breaks before training a trial (`_Driver._broken`)."""


def run_study(
    config: Config, progress: bool | None = None, launch: Launch | None = None
) -> StudyOutcome:
    """Run (or resume) the study of `config` until it has `study.n_trials` finished trials.

    Ray: the cluster at `ray_address(config)`, else Ray embedded in this process (unless it
    already runs Ray), as `launch.prepare` decides (the command line calls it first, to start
    compiling sooner). `progress`: a bar (True), a line per finished trial (False), or a bar on
    a terminal only (None). Bad input raises ConfigError before anything is written.
    """
    started, started_cpu = time.perf_counter(), time.process_time()
    output = Output(config.output)
    _check_search(config)
    check_output_location(config, output)
    output.check_writable()
    check_output(output, config)
    output.check_free()
    custom_storage = (
        open_storage(config.study.storage, config.study.name) if config.study.storage else None
    )
    if custom_storage is not None:
        check_output_bound(config, output, custom_storage)
    launch = launch or prepare(config)
    import_in_background("pipeline.summary.plots")  # for the summary, while Ray starts
    import_in_background("scipy.stats")  # the summary's Kaplan–Meier (half a second or more)
    embedded = connect_ray(config, launch)
    try:
        check_placement(config, launch.embedded)
        with output.lock(only_writer=config.study.only_writer):
            journal = output.path(JOURNAL) if output.exists(JOURNAL) else None
            storage = custom_storage or (journal and open_storage(journal))
            check_storage_knows(config, output, read_steps_outcomes(output), storage)
            claim_output(output, config)
            storage = storage or open_storage(output.path(JOURNAL))
            study = optuna.create_study(
                storage=storage,
                study_name=config.study.name,
                sampler=make_sampler(config),
                pruner=make_pruner(config),
                direction="minimize",
                load_if_exists=True,
            )
            if custom_storage is not None:
                bind_output(study, output)
            driver = _Driver(config, launch, output, study, progress, grouping(storage))
            driver.recover()
            looping = time.perf_counter()
            ran = driver.run()
            trained = time.perf_counter()
            # An embedded Ray takes a second or two to stop: let it while the summary is drawn.
            stopping = stop_in_background(embedded)
            embedded = False
            if driver.rows:
                write_summary(config.output)
            summarized = time.perf_counter()
            stopping.join()
    finally:
        if embedded:
            stop_embedded_ray()
    best = min(
        (row for row in driver.rows.values() if row["state"] == "COMPLETE"),
        key=lambda row: row["value"],
        default=None,
    )
    return StudyOutcome(
        counts=dict(Counter(row["state"] for row in driver.rows.values())),
        ran=ran,
        best_value=best["value"] if best else None,
        best_params={c: best[c] for c in driver.columns} if best else None,
        seconds=time.perf_counter() - started,
        phases=Phases(looping - started, trained - looping, summarized - trained),
        driver_cpu_seconds=time.process_time() - started_cpu,
        windows_stepped=driver.windows_stepped,
        lane_windows=driver.lane_windows,
        side_by_side=driver.side_by_side,
        run_again=driver.run_again,
    )


class _Driver:
    """The study's one loop: ask trials when lanes can take them, place them on trainers,
    relay pruning, record outcomes."""

    def __init__(
        self,
        config: Config,
        launch: Launch,
        output: Output,
        study: optuna.Study,
        progress: bool | None,
        group: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.config = config
        self.launch = launch
        self.output = output
        self.study = study
        # What is asked, or told, at once is written to the storage at once (`grouping`).
        self.group = group
        self.columns = param_columns(config)
        self.asker = Asker(config, study)
        self.lanes = config.study.lanes_per_trainer or DEFAULT_LANES[config.study.sampler]
        self.rows: dict[int, dict[str, Any]] = {}
        self.queue: deque[PlannedTrial] = deque()
        self.attempts: Counter[int] = Counter()
        # Each trial's last report (step, value) and all its reports in its current attempt
        # (what the pruner judges it on), and the last step it reported to Optuna in any.
        self.last_report: dict[int, tuple[int, float]] = {}
        self.attempt_reports: dict[int, dict[int, float]] = {}
        self.told_up_to: dict[int, int] = {}
        self.unrecorded: list[TrialResult] = []
        self.last_recorded = -math.inf
        self.trials_written = time.monotonic()
        self.trainers: list[TrainerRecord] = []
        self.progress = Progress(config.study.n_trials, progress)
        # The loss sits near ln 2 for hundreds of windows before a model finds the echo, so no
        # trial is judged (nor reports) during its first epoch; without a pruner, none reports.
        self.judge_from = config.task.windows_per_epoch
        self.report_every = config.study.report_every if config.study.pruner != "none" else None
        self.broken_in_a_row = 0  # trainers that broke (`_broken`) since a trial finished
        self.windows_stepped = 0
        self.lane_windows = 0
        self.side_by_side = 0
        self.run_again = 0

    def recover(self) -> None:
        """Pick up what earlier runs left. A trial a dead driver left running is told from its
        recorded row when its steps were written; else it is marked FAIL (a grid point with no
        recorded trial runs again). Each step can be repeated: a kill during recovery is
        recovered from the same way."""
        self.rows = read_steps_outcomes(self.output)
        with self.group():
            for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                row = self.rows.get(frozen.number)
                if row is None:
                    log.warning("trial %d was left running by a stopped study", frozen.number)
                    self.study.tell(frozen.number, state=TrialState.FAIL)
                else:
                    self.study.tell(frozen.number, told_value(row), state=TrialState[row["state"]])
                failpoint("recovering")
        self.asker.start(self.rows.values())
        self.progress.start(self.rows.values())
        self._write_trials_table()

    def run(self) -> int:
        """Run trials until the study has its count of finished trials; returns how many ran."""
        before = len(self.rows)
        self.trainers = [self._new_trainer() for _ in range(self._slots())]
        try:
            while True:
                self._ask()
                self._place()
                self._lend()
                self._exchange()
                calls = [t.call for t in self.trainers if t.call is not None]
                if not self._in_flight() and not self.unrecorded and self._wanted() <= 0:
                    break
                if not calls:
                    break
                ray.wait(calls, num_returns=1, timeout=0.2)
                ready, _ = ray.wait(calls, num_returns=len(calls), timeout=0)
                with self.group():  # the pruner's reports
                    for trainer in [t for t in self.trainers if t.call in ready]:
                        self._collect(trainer)
                self._watch_unplaced_trainers()
                self._record_if_due()
                self.progress.tick(running=sum(len(t.trials) for t in self.trainers))
            self._record()
        finally:
            self.progress.close()
            for trainer in self.trainers:
                ray.kill(trainer.actor)
        self._write_trials_table()
        return len(self.rows) - before

    def _slots(self) -> int:
        """Trainers to run: as many as the live nodes hold, each trainer on one node."""
        return max(1, trainers_that_fit(self.config))

    def _new_trainer(self) -> TrainerRecord:
        actor = start_trainer(self.config, self.launch, self.report_every, self.judge_from)
        return TrainerRecord(actor, time.monotonic())

    def _in_flight(self) -> int:
        return len(self.queue) + sum(len(t.trials) for t in self.trainers)

    def _ask(self) -> None:
        """Ask Optuna for trials while lanes are free: never more than the trainers can take
        now, so a sampler that learns sees every trial that finished before it asks."""
        capacity = self.lanes * len(self.trainers)
        with self.group():
            while self._in_flight() < capacity and self._wanted() > 0:
                planned = self.asker.ask({t.point for t in self._unfinished()})
                if planned is None:
                    return
                self.queue.append(planned)

    def _wanted(self) -> int:
        """Trials still to ask for: finished trials are the recorded ones."""
        done = len(self.rows) + len(self.unrecorded)
        return self.config.study.n_trials - done - self._in_flight()

    def _unfinished(self) -> Iterator[PlannedTrial]:
        yield from self.queue
        for trainer in self.trainers:
            yield from trainer.trials.values()

    def _place(self) -> None:
        """Place queued trials on trainers with room, by their estimated work left: the trials
        of one architecture queued in a row as a run, whole where that keeps the trainers even
        (`place_run`)."""
        works: list[TrialWork] = []  # weighed once a trainer has room (6 ms for 64 trials)
        while self.queue:
            roomy = [t for t in self.trainers if len(t.trials) < self.lanes]
            if not roomy:
                return
            # A trainer that has answered is known to run; a new one may wait for room.
            roomy = [t for t in roomy if t.answered] or roomy
            works = works or [_work(planned) for planned in self.queue]
            rooms = [self.lanes - len(t.trials) for t in roomy]
            for index in place_run([t.work for t in roomy], rooms, works):
                roomy[index].take(self.queue.popleft(), works.pop(0))

    def _lend(self) -> None:
        """With Ray on this one machine, once no trial is left to ask or place, lend the CPUs of
        the trainers with nothing left to train to those still training (`Trainer.lend`): the
        last sets of lanes, which the cost estimate never splits quite evenly between trainers,
        then step side by side instead of leaving cores idle. On a cluster the idle CPUs may be
        on another node, and nothing is lent."""
        busy = [trainer for trainer in self.trainers if trainer.trials]
        idle_cpus = (len(self.trainers) - len(busy)) * self.config.ray.cpus_per_trainer
        at_the_end = not self.queue and self._wanted() <= 0
        share = idle_cpus // len(busy) if busy and at_the_end and self.launch.embedded else 0
        for trainer in self.trainers:
            lent = share if trainer.trials else 0
            if trainer.lent != lent:  # taken back when trials are placed again (a retry)
                trainer.actor.lend.remote(lent)
                trainer.lent = lent

    def _exchange(self) -> None:
        """Start an exchange with every trainer that has something to do and none in flight."""
        for trainer in self.trainers:
            if trainer.call is None and (trainer.trials or trainer.inbox or not trainer.answered):
                admit = [
                    LaneTrial(t.number, t.config, self.attempts[t.number]) for t in trainer.inbox
                ]
                trainer.call = trainer.actor.exchange.remote(
                    admit, trainer.verdicts, EXCHANGE_WAIT_SECONDS
                )
                trainer.inbox, trainer.verdicts = [], {}

    def _collect(self, trainer: TrainerRecord) -> None:
        call, trainer.call = trainer.call, None
        try:
            events = ray.get(call)
        except (ray.exceptions.RayError, OSError) as error:
            # Whatever Ray raises for a lost worker, node or object (a dead actor, an object
            # lost with its node or owner, a fetch that timed out): the trainer is lost.
            self._lost(trainer, f"{type(error).__name__}: {first_line(error)}")
            return
        trainer.answered = True
        self.windows_stepped += sum(events.windows.values())
        self.lane_windows += events.lane_windows
        self.side_by_side += events.side_by_side
        trainer.work.stepped(events.windows)
        for report in events.reports:
            trainer.verdicts[report.key] = self._judge(report)
        for finished in events.finished:
            self._finished(trainer.release(finished.key), finished)
        for key, text in events.errors:
            self._failed(trainer.release(key), text)
        if events.finished:
            self.broken_in_a_row = 0
        if events.broken is not None:
            self._broken(trainer, events.broken)

    def _broken(self, trainer: TrainerRecord, text: str) -> None:
        """A trainer whose own machinery failed (not a trial's training): its trials run
        elsewhere, as a lost worker's, without counting against their retries; when more
        trainers than the study has break in a row, none can train here and the study stops."""
        self.broken_in_a_row += 1
        if self.broken_in_a_row > self._slots():
            self._record()
            for trial in self.asker.asked.values():  # not run: a rerun runs them
                self.study.tell(trial, state=TrialState.FAIL)
            raise NoTrainerCanTrain(
                f"no trainer can train here: {self.broken_in_a_row} trainers in a row failed "
                f"before any trial finished ({text}); what finished is kept, so fix that and "
                "run the study again"
            )
        self._lost(trainer, f"it cannot train ({text})", retry=False)

    def _judge(self, report: Report) -> bool:
        """Report a running loss to Optuna; True when its pruner stops the trial."""
        trial = self.asker.asked.get(report.key)
        if trial is None:  # recorded meanwhile: nothing left to judge
            return False
        self.last_report[report.key] = (report.step, report.value)
        self.attempt_reports.setdefault(report.key, {})[report.step] = report.value
        if report.step > self.told_up_to.get(report.key, -1):
            trial.report(report.value, report.step)
            self.told_up_to[report.key] = report.step
            return trial.should_prune()
        # Run again after its trainer was lost, at a step its first attempt reported.
        return judge_attempt(self.study, report.key, self.attempt_reports[report.key])

    def _finished(self, planned: PlannedTrial, finished: Finished) -> None:
        _, last_value = self.last_report.get(planned.number, (-1, None))
        self._hold(
            TrialResult(
                planned.number,
                planned.config,
                planned.param_values,
                finished.losses,
                finished.status,
                seconds=finished.seconds,
                pruned_value=last_value,
            )
        )

    def _failed(self, planned: PlannedTrial, text: str) -> None:
        empty = np.zeros(0, np.float32)
        self._hold(TrialResult(planned.number, planned.config, planned.param_values, empty,
                               "error", error=text))  # fmt: skip

    def _hold(self, result: TrialResult) -> None:
        self.unrecorded.append(result)

    def _lost(self, trainer: TrainerRecord, text: str, retry: bool = True) -> None:
        """A trainer died with its worker or node (`text` says how): run its trials again
        elsewhere, up to ray.max_retries times each (`retry`: whether this counts as one), and
        start a trainer in its place if the cluster has room."""
        log.warning("a trainer was lost (%s); its %d trials run again", text, len(trainer.trials))
        self.trainers.remove(trainer)
        ray.kill(trainer.actor)  # gone, or at least gone for us: its CPUs go to its successor
        for planned in trainer.trials.values():
            self.attempts[planned.number] += retry
            self.last_report.pop(planned.number, None)
            self.attempt_reports.pop(planned.number, None)
            if self.attempts[planned.number] > self.config.ray.max_retries:
                self._failed(planned, text)
            else:
                self.queue.appendleft(planned)
                self.run_again += 1
        # Ray marks a lost node's CPUs gone within seconds; a trainer asked for too early
        # waits for room and is given up after ray.placement_timeout_s.
        time.sleep(0.5)
        while len(self.trainers) < self._slots():
            self.trainers.append(self._new_trainer())

    def _watch_unplaced_trainers(self) -> None:
        """A trainer that never answered (Ray found no room for it, or its node went away) is
        never waited for in silence: it says what it waits for, and after
        ray.placement_timeout_s it is given up, its trials handed to the trainers that run; when
        none runs, the study stops."""
        now, timeout = time.monotonic(), self.config.ray.placement_timeout_s
        unplaced = [trainer for trainer in self.trainers if not trainer.answered]
        # One line for every trainer still waiting once any is due: started a moment apart,
        # they were told of one at a time, a line each.
        due = any(not t.noticed and now - t.started > self._notice_after() for t in unplaced)
        notice = [t for t in unplaced if not t.noticed] if due else []
        if notice:
            free = ray.available_resources()
            log.warning(
                "%d trainer(s) wait for Ray to place them, each asking %s; free now: %g CPU, "
                "%g GPU; given up after %g s (ray.placement_timeout_s)",
                len(notice), describe_asks(self.config), free.get("CPU", 0), free.get("GPU", 0),
                timeout,
            )  # fmt: skip
            for trainer in notice:
                trainer.noticed = True
        overdue = [trainer for trainer in unplaced if now - trainer.started > timeout]
        if overdue and len(overdue) == len(self.trainers):
            raise ConfigError(
                f"no trainer was placed by Ray in {timeout:g} s (ray.placement_timeout_s): each "
                f"asks {describe_asks(self.config)}, and the cluster never had that free"
            )
        for trainer in overdue:
            log.warning("a trainer was not placed in %g s; giving it up", timeout)
            ray.kill(trainer.actor)
            self.trainers.remove(trainer)
            self.queue.extendleft(trainer.trials.values())

    def _notice_after(self) -> float:
        return min(WAIT_NOTICE_SECONDS, self.config.ray.placement_timeout_s / 2)

    def _record_if_due(self) -> None:
        since = time.monotonic() - self.last_recorded
        # A sampler or pruner that learns from finished trials hears of each one at once.
        learns = self.config.study.sampler == "tpe" or self.config.study.pruner != "none"
        full = len(self.unrecorded) >= RECORD_EVERY_TRIALS
        if self.unrecorded and (learns or full or since >= RECORD_EVERY_SECONDS):
            self._record()
        if time.monotonic() - self.trials_written > TRIALS_TABLE_EVERY_SECONDS:
            self._write_trials_table()

    def _record(self) -> None:
        """Write the held trials' steps as one file, then tell Optuna: a crash in between is
        recovered from the file."""
        if not self.unrecorded:
            return
        results, self.unrecorded = self.unrecorded, []
        self.last_recorded = time.monotonic()
        rows = record_trials(self.output, results)
        failpoint("written")
        with self.group():
            for result, row in zip(results, rows, strict=True):
                trial = self.asker.recorded(result.number, row)
                for reports in (self.last_report, self.attempt_reports, self.told_up_to):
                    reports.pop(result.number, None)
                self.study.tell(trial, told_value(row), state=TrialState[row["state"]])
                failpoint("told")
                self.rows[result.number] = row
        for row in rows:
            self.progress.record(row, self.columns)

    def _write_trials_table(self) -> None:
        rows = [self.rows[n] for n in sorted(self.rows)]
        self.output.write_table(TRIALS, trials_table(rows, self.columns))
        self.trials_written = time.monotonic()


def _work(planned: PlannedTrial) -> TrialWork:
    """A queued trial as placement sees it."""
    return TrialWork(lanes_key(planned.config), planned.config.model, planned.config.total_steps)


def _check_search(config: Config) -> None:
    if not config.study.search:
        raise ConfigError(
            "study.search is empty: list at least one key to vary, e.g. task.echo_step: [3, 15]"
        )
