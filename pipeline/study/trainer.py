"""The trainer: a long-lived Ray actor that trains the trials the driver (study/driver.py) places on
it, in lanes (lanes.py), and tells it what happened.

Ray imports this module in every worker process that runs a trainer, so it imports only what
training needs: no pandas, pyarrow, Optuna or matplotlib, which the driver alone uses (their
import took a trainer's worker about 1.8 s of a core, while the driver and the other trainers
start on the same cores). Nor does it import torch when imported: the driver imports it too,
to start trainers, and never trains; a trainer imports what it trains with in its own worker,
and one that trains on the CPU with the numba kernels never imports torch (its import took
0.8 s of each trainer's start).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import ray

from pipeline.config import Config, TrainConfig, first_line
from pipeline.results.failpoints import (
    TRAINER_BREAK,
    TrainerFailpoint,
    die,
    trainer_breaks,
    trainer_failpoint,
)
from pipeline.study.exchange import TrainerEvents
from pipeline.study.launch import Launch
from pipeline.training.device import load_cpu_kernels, window_step
from pipeline.training.trial import LaneTrial, lanes_key

if TYPE_CHECKING:
    from pipeline.training.lanes import Lanes


@ray.remote
class Trainer:
    """A long-lived trainer: lanes for each architecture it is given, stepped in turn by a
    thread of its own, so that it trains while the driver records and asks. The driver talks
    to it through `exchange` alone, one call at a time.

    `train` is the study's train section: on the CPU the thread loads the numba kernels as soon
    as it starts, while the first trials are on their way; `compile_missing`: whether it
    compiles the kernels its windows want that no process compiled ahead (see
    `device.load_cpu_kernels`); `failpoint`: when to kill itself, in tests (failpoints.py)."""

    def __init__(
        self,
        train: TrainConfig,
        cpus: int,
        report_every: int | None,
        judge_from: int,
        compile_missing: bool = True,
        failpoint: TrainerFailpoint | None = None,
    ) -> None:
        self.train = train
        self.cpus = cpus
        self.compile_missing = compile_missing
        self.report_every = report_every
        self.judge_from = judge_from
        self.lanes: dict[tuple, Lanes] = {}
        self.changed = threading.Condition()
        self.inbox: list[LaneTrial] = []
        self.verdicts: dict[int, bool] = {}
        self.events = TrainerEvents([], [], [])
        self.stepped: Counter[tuple] = Counter()
        self.trained = 0
        self.side_by_side = 0
        self.turns = 0
        self.lent_cpus = 0
        self.stepping: tuple[int, ThreadPoolExecutor] | None = None
        self.broken: str | None = None
        """Why the training thread died, if it did: the driver then gives this trainer up."""
        self.failpoint = failpoint
        threading.Thread(target=self._train, daemon=True).start()

    def exchange(
        self, admit: list[LaneTrial], verdicts: dict[int, bool], wait: float
    ) -> TrainerEvents:
        """Hand over trials to admit and pruner verdicts; return what happened since the last
        exchange, waiting up to `wait` seconds for something to happen."""
        with self.changed:
            if self.broken is None:  # else nothing trains here: the driver places them again
                self.inbox += admit
            self.verdicts.update(verdicts)
            self.changed.notify_all()
            self.changed.wait_for(self._has_events, timeout=wait)
            events = dataclasses.replace(
                self.events,
                windows=dict(self.stepped),
                lane_windows=self.trained,
                side_by_side=self.side_by_side,
                turns=self.turns,
                broken=self.broken,
            )
            self.events, self.stepped, self.trained = TrainerEvents([], [], []), Counter(), 0
            self.side_by_side = self.turns = 0
            return events

    def lend(self, cpus: int) -> None:
        """Step lanes on `cpus` more threads, CPUs of this machine that other trainers left idle
        (the driver lends them once no trial is left to place; 0 takes them back)."""
        with self.changed:
            self.lent_cpus = cpus

    def where(self) -> dict[str, Any]:
        """Where Ray placed this trainer: its node, and the GPUs it was given."""
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def _has_events(self) -> bool:
        events = self.events
        return bool(events.finished or events.reports or events.errors or self.broken)

    def _train(self) -> None:
        try:
            if trainer_breaks():
                raise RuntimeError(f"{TRAINER_BREAK} says this trainer cannot train")
            load_cpu_kernels(self.train, _gpu_from_ray(), self.compile_missing)
            self._train_forever()
        except BaseException as error:  # the driver must hear of it, never wait on a dead thread
            # Not a trial's error (those are caught where its lanes step): this trainer's own.
            # Its trials are not failed here: the driver runs them elsewhere.
            self.lanes.clear()
            with self.changed:
                self.broken = f"{type(error).__name__}: {first_line(error)}"
                self.inbox = []
                self.changed.notify_all()
            raise

    def _train_forever(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.inbox or self.verdicts or self._busy())
                self.turns += 1
                inbox, self.inbox = self.inbox, []
                verdicts, self.verdicts = self.verdicts, {}
                threads = 1 + self.lent_cpus
            self._apply(inbox, verdicts)
            sets = list(self.lanes.items())
            if threads > 1 and len(sets) > 1 and _all_numba(sets):
                # The numba kernels release the GIL: sets of lanes step side by side.
                stepped = sum(self._stepping(threads).map(lambda item: self._step(*item), sets))
                with self.changed:
                    self.side_by_side += stepped
            else:
                for key, lanes in sets:
                    self._step(key, lanes)

    def _stepping(self, threads: int) -> ThreadPoolExecutor:
        if self.stepping is None or self.stepping[0] != threads:
            if self.stepping is not None:
                self.stepping[1].shutdown(wait=False)
            self.stepping = (threads, ThreadPoolExecutor(threads, thread_name_prefix="lanes"))
        return self.stepping[1]

    def _busy(self) -> bool:
        return any(lanes.running.any() for lanes in self.lanes.values())

    def _apply(self, inbox: list[LaneTrial], verdicts: dict[int, bool]) -> None:
        for lanes in self.lanes.values():
            pruned = [key for key, prune in verdicts.items() if prune]
            self._publish(lanes.stop(pruned), [], [])
            lanes.resume(key for key, prune in verdicts.items() if not prune)
        arriving = Counter(lanes_key(trial.config) for trial in inbox)
        for trial in inbox:
            try:
                lanes = self._lanes_for(trial.config)
                lanes.reserve(arriving.pop(lanes_key(trial.config), 1))
                lanes.admit(trial)
            except Exception as error:  # a trial that cannot start is FAIL; the rest go on
                self._publish([], [], [(trial.key, f"{type(error).__name__}: {first_line(error)}")])

    def _step(self, key: tuple, lanes: Lanes) -> bool:
        """Step `lanes` on their next window; whether any lane ran."""
        running = int(lanes.running.sum())
        try:
            finished, reports = lanes.step()
        except Exception as error:  # these lanes' trials fail; other architectures go on
            text = f"{type(error).__name__}: {first_line(error)}"
            keys = [trial.key for trial in lanes.trials if trial is not None]
            del self.lanes[key]
            self._publish([], [], [(k, text) for k in keys])
            return False
        with self.changed:
            if lanes.last_windows:
                self.stepped[key] += lanes.last_windows
            self.trained += lanes.last_lane_windows
        if self.failpoint is not None:
            self._pass_failpoint(lanes)
        if finished or reports:
            self._publish(finished, reports, [])
        return running > 0

    def _pass_failpoint(self, lanes: Lanes) -> None:
        """Die once the failpoint's trial, on its first attempt, has run its windows (fewer
        than it has: a trial that ends is gone from its lane)."""
        lane = lanes.lane_of.get(self.failpoint.trial)
        if lane is None or lanes.trials[lane].attempt > 0:
            return
        if lanes.position[lane] >= self.failpoint.windows:
            die()

    def _publish(self, finished: list, reports: list, errors: list) -> None:
        if not (finished or reports or errors):
            return
        with self.changed:
            self.events.finished.extend(finished)
            self.events.reports.extend(reports)
            self.events.errors.extend(errors)
            self.changed.notify_all()

    def _lanes_for(self, config: Config) -> Lanes:
        from pipeline.training.lanes import Lanes

        key = lanes_key(config)
        if key not in self.lanes:
            step, device = window_step(config, self.cpus, _gpu_from_ray())
            self.lanes[key] = Lanes(
                config, step, device, self.report_every, self.judge_from, step.max_windows
            )
        return self.lanes[key]


def _all_numba(sets: list[tuple[tuple, Lanes]]) -> bool:
    return all(lanes.step_fn.backend == "numba" for _, lanes in sets)


def _gpu_from_ray() -> bool:
    """Whether Ray gave this trainer a GPU: `auto` trains there, else on the CPU."""
    return bool(ray.get_gpu_ids())


def start_trainer(
    config: Config, launch: Launch, report_every: int | None = None, judge_from: int = 0
) -> Any:
    """A Trainer actor with the CPUs and GPUs the config asks of Ray for each trainer."""
    return Trainer.options(
        num_cpus=config.ray.cpus_per_trainer,
        num_gpus=gpus_per_trainer(config),
        max_restarts=0,
        max_concurrency=2,  # one call waits for events while the trainer thread trains
    ).remote(
        config.train,
        config.ray.cpus_per_trainer,
        report_every,
        judge_from,
        # With Ray embedded, the driver compiles ahead the kernels the study wants.
        compile_missing=not launch.embedded,
        failpoint=trainer_failpoint(),
    )


def gpus_per_trainer(config: Config) -> float:
    """ray.gpus_per_trainer, else 1 when the trials train on CUDA (asked for, or auto on a
    cluster with GPUs), else 0: Ray then sets CUDA_VISIBLE_DEVICES, so torch's cuda:0 is the
    GPU Ray gave the trainer, never one taken behind Ray's back."""
    if config.ray.gpus_per_trainer is not None:
        return config.ray.gpus_per_trainer
    device = config.train.device
    if device.startswith("cuda"):
        return 1.0
    if device == "auto" and ray.cluster_resources().get("GPU", 0) > 0:
        return 1.0
    return 0.0
