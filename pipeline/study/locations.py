"""Where a study writes, checked before Ray starts: an output or a storage that would be lost
(a relative path inside a Ray job, whose working directory is a temporary copy), and outputs that
cannot hold what the study writes there."""

from __future__ import annotations

import os

from pipeline.config import Config, ConfigError
from pipeline.results.output import Output

# What a relative path would be relative to inside a Ray job: said by every refusal of one.
IN_A_JOB = (
    "but this runs as a Ray job, in a temporary copy of the working directory that is deleted "
    "afterwards"
)


def check_output_location(config: Config, output: Output) -> None:
    """Refuse, before Ray starts, an output or storage that the study could not keep: a
    relative path inside a Ray job, an object-store output that cannot be locked (unless
    study.only_writer), or one where the default journal file cannot live."""
    in_a_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
    if in_a_job and "://" not in config.output and not os.path.isabs(config.output):
        raise ConfigError(
            f"output {config.output!r} is relative, {IN_A_JOB}: give an absolute path "
            "(--output /data/echo-grid) or a URI (s3://bucket/echo-grid)"
        )
    storage = config.study.storage
    if in_a_job and storage is not None and _relative_file(storage):
        raise ConfigError(
            f"study.storage = {storage!r} is relative, {IN_A_JOB}: give an absolute path "
            "(/data/echo.journal, sqlite:////data/echo.db) or a database URL"
        )
    if not output.is_local and not config.study.only_writer:
        with output.lock():  # refuses at once, before Ray starts
            pass
    if not output.is_local and config.study.storage is None:
        raise ConfigError(
            f"output {config.output!r} is not a local folder, where the default journal file "
            "cannot live: set study.storage to an Optuna storage URL (e.g. postgresql://...)"
        )


def _relative_file(storage: str) -> bool:
    """Whether a storage is a file at a relative path: a journal file's path, or an SQLite URL
    with three slashes (four for an absolute path)."""
    if storage.startswith("sqlite:///"):
        path = storage.removeprefix("sqlite:///")
        return bool(path) and not path.startswith(("/", ":memory:"))
    return "://" not in storage and not os.path.isabs(storage)
