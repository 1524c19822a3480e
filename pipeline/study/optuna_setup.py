"""Optuna, set up for the driver: samplers, pruners, the distributions of the searched keys,
and the storages (a journal file in the output folder by default, or a database URL)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any
from urllib.parse import urlsplit

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend
from optuna.trial import TrialState

from pipeline.config import Config, ConfigError, SearchParam, first_line
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
        return optuna.samplers.TPESampler(seed=study.seed, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=study.seed)


class GridPoint(optuna.samplers.BaseSampler):
    """The grid, as the driver walks it: Optuna's GridSampler picks points at random and scans
    the whole grid and every trial on each ask; the driver instead walks the points in a fixed
    order, skipping those recorded, and hands each one to Optuna through this sampler."""

    def __init__(self) -> None:
        self.point: dict[str, Any] = {}

    def infer_relative_search_space(self, study, trial) -> dict:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict:
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        return self.point[param_name]


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
