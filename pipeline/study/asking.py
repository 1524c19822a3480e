"""Asking Optuna for a study's trials: each point of the search space run once, and what a
trainer needs of each asked trial.

A grid runs its points in order, skipping those recorded or running. Another sampler may draw a
point that was run before: a point's seed derives from its parameters (never its trial number),
so a second run of it would only copy the first. Such a draw is told FAIL (samplers ignore
those) and the sampler asked again, up to DUPLICATE_ASKS times in a row; then the space is
taken as spent and nothing more is asked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline.config import Config, short_name
from pipeline.results.failpoints import failpoint
from pipeline.results.tables import FIXED_COLUMNS
from pipeline.study.optuna_setup import distribution
from pipeline.study.placement import grid_points
from pipeline.study.records import PlannedTrial
from pipeline.training.data import trial_seed

log = logging.getLogger(__name__)

# A sampler that draws this many points in a row that were run before has spent its space.
DUPLICATE_ASKS = 50


class Asker:
    """The study's asks: `ask` gives the next trial to run, `asked` holds every trial asked and
    not yet recorded (`recorded` takes it out), by trial number."""

    def __init__(self, config: Config, study: optuna.Study) -> None:
        self.config = config
        self.study = study
        grid = config.study.sampler == "grid"
        self.distributions = {p.short_name: distribution(p, grid) for p in config.study.search}
        # Optuna refuses another kind of distribution for a parameter its trials already have.
        for trial in study.get_trials(deepcopy=False)[:1]:
            self.distributions.update(
                {k: d for k, d in trial.distributions.items() if k in self.distributions}
            )
        self.asked: dict[int, optuna.Trial] = {}
        self.points: Iterator[tuple] = iter(())
        self.recorded_points: set[tuple] = set()
        self.spent = False  # the sampler draws only points run before (`_ask_new_point`)

    def start(self, rows: Iterable[dict[str, Any]]) -> None:
        """Begin from the recorded trials `rows`: their points are run; a grid goes through
        its points from the first."""
        self.recorded_points = {self.point_of(row) for row in rows}
        if self.config.study.sampler == "grid":
            self.points = iter(grid_points(self.config))

    def ask(self, running: set[tuple]) -> PlannedTrial | None:
        """The next trial to run, at a point neither recorded nor `running`; None when the
        search space has no such point left."""
        if self.config.study.sampler == "grid":
            point = self._next_grid_point(running)
            return None if point is None else self._planned(self._trial_at(point))
        return self._ask_new_point(running)

    def _trial_at(self, point: tuple) -> optuna.Trial:
        """A running trial of the study at the grid's `point`, written to the storage whole, in
        one entry. Optuna's ask with fixed distributions writes the trial, then each parameter:
        to a journal five appends, each under its lock and synced to disk, 2.7 ms of the
        driver's time a trial against 0.9 (configs/study.yaml's 336 points)."""
        params = dict(zip(self.distributions, point, strict=True))
        template = optuna.trial.create_trial(
            state=TrialState.RUNNING, params=params, distributions=self.distributions
        )
        # What Study.ask and Study.add_trial call; add_trial would not say which trial it made.
        trial_id = self.study._storage.create_new_trial(self.study._study_id, template)
        return optuna.Trial(self.study, trial_id)

    def recorded(self, number: int, row: dict[str, Any]) -> optuna.Trial:
        """The asked trial `number`, now recorded as `row`: no longer asked, its point run."""
        self.recorded_points.add(self.point_of(row))
        return self.asked.pop(number)

    def point_of(self, row: dict[str, Any]) -> tuple:
        return tuple(row[p.short_name] for p in self.config.study.search)

    def _ask_new_point(self, running: set[tuple]) -> PlannedTrial | None:
        if self.spent:
            return None
        taken = self.recorded_points | running
        for _ in range(DUPLICATE_ASKS):
            trial = self.study.ask(self.distributions)
            planned = self._planned(trial)
            if planned.point not in taken:
                return planned
            trial.set_user_attr("skipped", "its point was run before")
            self.study.tell(self.asked.pop(trial.number), state=TrialState.FAIL)
        self.spent = True
        log.warning(
            "the sampler drew %d points in a row that were run before: the search space looks "
            "spent, so no more trials are asked (study.trials = %d)",
            DUPLICATE_ASKS,
            self.config.study.n_trials,
        )
        return None

    def _planned(self, trial: optuna.Trial) -> PlannedTrial:
        """What a trainer needs of an asked trial: its config, with its seed from its
        parameters."""
        search = self.config.study.search
        failpoint("asked")
        params = {p.key: trial.params[p.short_name] for p in search}
        trial_config = self.config.with_params(params)
        seed = trial_seed(self.config.study.seed, {**params, "train.seed": trial_config.train.seed})
        values = {name: trial_config.value(key) for name, key in FIXED_COLUMNS.items()}
        values.update({short_name(k): v for k, v in params.items()})
        self.asked[trial.number] = trial
        return PlannedTrial(
            trial.number,
            trial_config.with_params({"train.seed": seed}),
            values,
            tuple(params[p.key] for p in search),
        )

    def _next_grid_point(self, running: set[tuple]) -> tuple | None:
        for point in self.points:
            if point not in self.recorded_points and point not in running:
                return point
        return None
