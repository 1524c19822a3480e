"""The study's storage in a PostgreSQL database: Optuna's journal, in one append-only table.

Optuna's own database storage (RDBStorage) runs dozens of queries, each its own transaction,
for every ask and tell: measured at 10.7× the journal file's wall time on a study of tiny
trials. Its journal storage needs from a backend only two calls, "append these logs" and "read
the logs from number N on"; here each is one round trip to the server, and a group of asks or
tells (`JournalTable.group`) is a single transaction holding all their logs.

The table holds every study of the database, as a journal file does: `number` counts the logs
from 0 without a gap, which Optuna's replay relies on (it reads "from number N", N being the
logs it has applied). Appenders take the table's lock and number their logs after the last one,
so that numbers are committed in order: a reader sees a prefix of the journal, never a hole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from optuna.storages.journal import BaseJournalBackend

TABLE = "echo_study_journal"
# What a server that does not answer is given before the study stops, in seconds (libpq's
# default is to wait forever); a URL's own connect_timeout wins.
CONNECT_TIMEOUT_S = 10

_CREATE = f"CREATE TABLE IF NOT EXISTS {TABLE} (number BIGINT PRIMARY KEY, log TEXT NOT NULL)"
# CREATE TABLE IF NOT EXISTS is not safe against itself in PostgreSQL: two at once on a new
# database both find no table, and the second fails on the catalog's unique index. Creators
# take turns on this transaction-scoped advisory lock (any 64-bit key of our own: these bytes
# spell "echojrnl").
_CREATE_LOCK = "SELECT pg_advisory_xact_lock(%s)"
_CREATE_LOCK_KEY = int.from_bytes(b"echojrnl", "big", signed=True)
# The lock conflicts with itself and with no reader: appenders take turns, readers never wait.
_LOCK = f"LOCK TABLE {TABLE} IN SHARE ROW EXCLUSIVE MODE"
_APPEND = (
    f"INSERT INTO {TABLE} (number, log) "
    f"SELECT last.number + item.ord, item.log FROM "
    f"(SELECT COALESCE(MAX(number), -1) AS number FROM {TABLE}) AS last, "
    "unnest(%s::text[]) WITH ORDINALITY AS item(log, ord)"
)
_COUNT = f"SELECT COALESCE(MAX(number), -1) + 1 FROM {TABLE}"
_READ = f"SELECT log FROM {TABLE} WHERE number >= %s ORDER BY number"


def is_postgres_url(url: str) -> bool:
    """Whether an Optuna storage URL names a PostgreSQL database (any SQLAlchemy driver)."""
    return url.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def libpq_url(url: str) -> str:
    """The URL as libpq takes it: SQLAlchemy's `postgresql+driver://` without the driver."""
    scheme, rest = url.split("://", 1)
    return f"{scheme.split('+', 1)[0]}://{rest}"


def connect(url: str):
    """A connection in autocommit mode (transactions are explicit), giving up on a server that
    does not answer after CONNECT_TIMEOUT_S unless the URL says otherwise."""
    import psycopg

    conninfo = libpq_url(url)
    timeout = {} if "connect_timeout=" in conninfo else {"connect_timeout": CONNECT_TIMEOUT_S}
    return psycopg.connect(conninfo, autocommit=True, **timeout)


def rdb_holds_study(url: str, study_name: str) -> bool:
    """Whether Optuna's own database storage (its tables `studies` and `version_info`) holds a
    study of this name in the database."""
    with connect(url) as conn:
        (has_tables,) = conn.execute(
            "SELECT to_regclass('studies') IS NOT NULL AND to_regclass('version_info') IS NOT NULL"
        ).fetchone()
        if not has_tables:
            return False
        found = conn.execute("SELECT 1 FROM studies WHERE study_name = %s", [study_name])
        return found.fetchone() is not None


class JournalTable(BaseJournalBackend):
    """Optuna journal logs in the table `echo_study_journal` of a PostgreSQL database.

    Within `group()`, appended logs wait in memory, the table locked against other appenders,
    and are written in one statement when the group ends; a reader in this process meanwhile
    sees them after those already in the table, as it will once they are written. A process
    killed within a group leaves the table as it was before the group."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn = connect(url)
        with self._conn.transaction():
            self._conn.execute(_CREATE_LOCK, [_CREATE_LOCK_KEY])
            self._conn.execute(_CREATE)
        self._group: ExitStack | None = None
        """The open group, if any: its transaction begins with its first log."""
        self._pending: list[str] | None = None
        """The group's logs, once it has any."""
        self._written = 0
        """Logs in the table when the group took its lock."""

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"])

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        if self._pending is None:
            return self._read_table(log_number_from)
        # The group holds the lock: the table has no log this process has not read.
        logs = self._read_table(log_number_from) if log_number_from < self._written else []
        start = max(0, log_number_from - self._written)
        return logs + [json.loads(text) for text in self._pending[start:]]

    def _read_table(self, log_number_from: int) -> list[dict[str, Any]]:
        return [json.loads(text) for (text,) in self._conn.execute(_READ, [log_number_from])]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        texts = [json.dumps(log) for log in logs]
        if self._group is None:
            with self._conn.pipeline(), self._conn.transaction():
                self._conn.execute(_LOCK)
                self._conn.execute(_APPEND, [texts])
            return
        if self._pending is None:  # the group's first log: take the lock until its end
            self._group.enter_context(self._conn.transaction())
            with self._conn.pipeline():
                self._conn.execute(_LOCK)
                written = self._conn.execute(_COUNT)
            (self._written,) = written.fetchone()
            self._pending = []
        self._pending += texts

    @contextmanager
    def group(self) -> Iterator[None]:
        """Write every log appended within as one transaction, at the end; nothing if it raises.

        Other appenders wait from the group's first log to its end: keep a group to work that
        takes milliseconds (asking or telling a batch of trials), never to training. A group
        that appends nothing costs nothing."""
        if self._group is not None:  # nested: the outer group writes
            yield
            return
        with ExitStack() as self._group:
            try:
                yield
                if self._pending:
                    self._conn.execute(_APPEND, [self._pending])
            finally:
                self._group, self._pending = None, None
