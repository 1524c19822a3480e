"""Optuna, set up for the driver: samplers, pruners, the distributions of the searched keys,
and the storages (a journal file in the output folder by default, or a database URL)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import optuna
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.storages import JournalStorage
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import Config, ConfigError, SearchParam, first_line
from pipeline.results.output import Output
from pipeline.study.database import JournalTable, is_postgres_url, rdb_holds_study

JOURNAL = "study.journal"


def told_value(row: dict[str, Any]) -> float | None:
    """Optuna takes a value only with COMPLETE."""
    return row["value"] if row["state"] == "COMPLETE" else None


def distribution(param: SearchParam, grid: bool) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of a searched key. A numeric axis of a grid (whose points the
    driver picks itself) is given as the range of its choices: Optuna stores a trial's
    distributions with its parameters, and a list of 100 choices in every trial made a
    10,000-trial journal 2.4× as large and slow to replay."""
    choices = param.choices
    if grid and _numbers(choices):
        if all(isinstance(c, int) for c in choices):
            return optuna.distributions.IntDistribution(min(choices), max(choices))
        return optuna.distributions.FloatDistribution(min(choices), max(choices))
    if choices is not None:
        return optuna.distributions.CategoricalDistribution(list(param.choices))
    if isinstance(param.low, int) and isinstance(param.high, int):
        return optuna.distributions.IntDistribution(
            param.low, param.high, step=int(param.step or 1), log=param.log
        )
    return optuna.distributions.FloatDistribution(
        param.low, param.high, step=param.step, log=param.log
    )


def _numbers(choices: tuple) -> bool:
    return all(isinstance(c, int | float) and not isinstance(c, bool) for c in choices)


def make_sampler(config: Config) -> optuna.samplers.BaseSampler:
    study = config.study
    if study.sampler == "grid":
        return GridPoint()
    if study.sampler == "tpe":
        # Trials in flight are taken as scoring their worst (Optuna's advice for parallel TPE),
        # so the sampler does not ask the same promising spot again while it trains.
        return TrialSeededTPE(seed=study.seed, constant_liar=True)
    return TrialSeededRandom(seed=study.seed)


# What a trial's draws are seeded from, besides the study's seed and the trial's number.
RANDOM_DRAWS, TPE_DRAWS, TPE_STARTUP_DRAWS = 1, 2, 3


def reseed(state: LazyRandomState, study_seed: int, number: int, stream: int) -> None:
    """Seed a sampler's random state for trial `number` alone. A sampler seeded once, when
    the study starts, draws the same sequence from its start on every run: a study extended
    or resumed asked its first run's points again. Seeded from the trial's number, it draws
    what the storage's next trial has never drawn."""
    words = np.random.SeedSequence([study_seed, stream, number]).generate_state(1)
    state.rng.seed(int(words[0]))


class TrialSeededRandom(optuna.samplers.RandomSampler):
    """Optuna's random sampler, its draws for trial n seeded from (study seed, n): see
    `reseed`. It patches the sampler's private `_rng` (tests/study/test_optuna_setup.py fails if an
    Optuna upgrade moves it)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed=seed)
        self.study_seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        reseed(self._rng, self.study_seed, trial.number, RANDOM_DRAWS)
        super().before_trial(study, trial)


class TrialSeededTPE(optuna.samplers.TPESampler):
    """Optuna's TPE sampler, its draws for trial n (the model's, and those of its random
    start-up trials) seeded from (study seed, n): see `reseed`. It patches the private `_rng`
    and `_random_sampler._rng` (tests/study/test_optuna_setup.py fails if an upgrade moves them)."""

    def __init__(self, seed: int, **options: Any) -> None:
        super().__init__(seed=seed, **options)
        self.study_seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        reseed(self._rng, self.study_seed, trial.number, TPE_DRAWS)
        reseed(self._random_sampler._rng, self.study_seed, trial.number, TPE_STARTUP_DRAWS)
        super().before_trial(study, trial)


class GridPoint(optuna.samplers.BaseSampler):
    """The grid's sampler, which draws nothing: Optuna's GridSampler picks points at random and
    scans the whole grid and every trial on each ask; the driver instead walks the points in a
    fixed order, skipping those recorded, and writes each with its trial (`Asker`)."""

    def infer_relative_search_space(self, study, trial) -> dict:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict:
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        raise RuntimeError(
            f"a grid's trials are written with their points, not drawn ({param_name})"
        )


def make_pruner(config: Config) -> optuna.pruners.BasePruner:
    # No trial is judged during its first epoch (see judge_from).
    epoch = config.task.windows_per_epoch
    if config.study.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=epoch)
    if config.study.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=epoch, max_resource=config.total_steps)
    return optuna.pruners.NopPruner()


class Journal(JournalStorage):
    """Optuna's journal storage, minus a scan of every trial on each ask.

    `Study.ask` first looks for enqueued (WAITING) trials, and the journal answers by going over
    all of the study's trials: at 10^5 trials, asks alone grew quadratic. This driver never
    enqueues a trial, so none is ever waiting."""

    def __init__(self, backend: BaseJournalBackend) -> None:
        self.backend = backend
        super().__init__(backend)

    def get_all_trials(self, study_id, deepcopy=True, states=None):
        if states is not None and tuple(states) == (TrialState.WAITING,):
            return []
        return super().get_all_trials(study_id, deepcopy, states)


def grouping(storage: optuna.storages.BaseStorage) -> Callable[[], AbstractContextManager]:
    """Contexts in which what is asked and told is written as one transaction, on a storage
    that can (a journal in a database); elsewhere, contexts that do nothing."""
    if isinstance(storage, Journal) and isinstance(storage.backend, JournalTable):
        return storage.backend.group
    return nullcontext


def open_storage(url: str, study_name: str | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage: a database URL, or a path to a journal file. A PostgreSQL database
    holds the journal in a table, unless Optuna's own tables there already hold `study_name`
    (a study begun before this storage existed goes on where it is)."""
    try:
        if "://" not in url:
            return Journal(JournalFileBackend(url))
        if is_postgres_url(url) and not (study_name and rdb_holds_study(url, study_name)):
            return Journal(JournalTable(url))
        return optuna.storages.get_storage(url)
    except Exception as error:  # whatever the backend raises, the URL is what the user fixes
        raise ConfigError(storage_error(url, error)) from None


# The study's user attribute that names the output it writes to (a database storage's).
OUTPUT_ATTR = "output"


def output_name(output: Output) -> str:
    """How a storage names an output: its absolute path, or its URI."""
    return output.root if output.is_local else output.location


def check_storage_knows(
    config: Config, output: Output, rows: Mapping[int, Mapping[str, Any]], storage: Any
) -> None:
    """Refuse an output whose steps/ holds trials its storage does not know (the storage was
    lost or replaced): its trial numbers would start again at 0, over the recorded ones.
    `storage`: the opened storage, or None for a journal that does not exist yet."""
    known = _trials_of(storage, config.study.name)
    searched = [p.short_name for p in config.study.search]
    unknown = [
        number
        for number, row in sorted(rows.items())
        if number not in known or any(known[number].params.get(k) != row[k] for k in searched)
    ]
    if unknown:
        where = config.study.storage or output.path(JOURNAL)
        raise ConfigError(
            f"output {output.location} holds {len(unknown)} trials (trial {unknown[0]} first) "
            f"that study {config.study.name!r} in {where} does not know: its storage was lost "
            "or replaced; resume with the storage it was made with, or choose another --output"
        )


def _trials_of(storage: Any, name: str) -> dict[int, FrozenTrial]:
    if storage is None:
        return {}
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return {}
    return {t.number: t for t in storage.get_all_trials(study_id, deepcopy=False)}


def check_output_bound(config: Config, output: Output, storage: Any) -> None:
    """Refuse a second output for a study of a shared storage that another output's study
    already writes to: their drivers would each mark the other's running trials FAIL."""
    try:
        study_id = storage.get_study_id_from_name(config.study.name)
    except KeyError:
        return
    bound = storage.get_study_user_attrs(study_id).get(OUTPUT_ATTR)
    if bound is not None and bound != output_name(output):
        raise ConfigError(
            f"study {config.study.name!r} in {config.study.storage} writes to output {bound}, "
            f"not {output.location}: resume it with --output {bound}, or set another "
            "study.name for this output"
        )


def bind_output(study: optuna.Study, output: Output) -> None:
    """Name `output` in the study (see check_output_bound)."""
    if OUTPUT_ATTR not in study.user_attrs:
        study.set_user_attr(OUTPUT_ATTR, output_name(output))


def judge_attempt(study: optuna.Study, number: int, reports: Mapping[int, float]) -> bool:
    """The pruner's verdict on trial `number` as one attempt of it left it: its own
    `reports` (step → value) alone. A trial run again after its trainer was lost reports its
    first steps again, and Optuna keeps a step's first report and judges a trial at its last
    one, a step the new attempt has not reached."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    attempt = copy.copy(frozen)
    attempt.intermediate_values = dict(reports)
    return study.pruner.prune(study, attempt)


def storage_error(url: str, error: BaseException) -> str:
    """One line: the storage URL (its password hidden), what went wrong, what to do."""
    shown = _without_password(url)
    if isinstance(error, ImportError) and is_postgres_url(url):
        return (
            f"study.storage = {shown!r}: PostgreSQL needs psycopg: "
            "pip install 'echo-study[postgres]'"
        )
    text = first_line(error)
    reason = text.rsplit(" failed: ", 1)[-1].removeprefix("FATAL:").strip()
    address = urlsplit(url)
    if "timeout expired" in text or "Connection refused" in text or "translate host" in text:
        hint = (
            f"no database server answers at {address.hostname}:{address.port or 5432}; start "
            "it, or fix the host and port"
        )
    elif "password authentication failed" in text or ("role" in text and "does not exist" in text):
        hint = "give a user and password the server accepts, in the URL or in ~/.pgpass"
    elif "database" in text and "does not exist" in text:
        name = address.path.lstrip("/")
        hint = f"create it first (createdb {name}) or name one that exists"
    else:
        return f"study.storage = {shown!r}: cannot be opened ({reason})"
    return f"study.storage = {shown!r}: {reason}; {hint}"


def _without_password(url: str) -> str:
    address = urlsplit(url)
    if address.password is None:
        return url
    login = address.netloc.rsplit("@", 1)[0]
    return url.replace(f"{login}@", f"{address.username}:***@", 1)
