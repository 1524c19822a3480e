"""Progress of a study: a bar on a terminal; in a log (a Ray job's), a line per finished trial
and, while none finishes, a line a minute saying how many run, so that a study of long trials
never sits silent in `ray job logs`."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from tqdm import tqdm


class Progress:
    """A bar on a terminal (done / pruned / failed, best value); otherwise a line per trial."""

    def __init__(self, total: int, bar: bool | None, heartbeat_s: float = 60.0) -> None:
        self.total = total
        self.heartbeat_s = heartbeat_s
        self.started = self.last_line = time.monotonic()
        self.counts: Counter[str] = Counter()
        self.best: float | None = None
        use_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = tqdm(total=total, unit="trial", disable=not use_bar, dynamic_ncols=True)

    def start(self, rows: Iterable[dict[str, Any]]) -> None:
        """Count the trials earlier runs finished."""
        for row in rows:
            self._count(row)
        self.bar.update(sum(self.counts.values()))
        self._postfix()

    def record(self, row: dict[str, Any], columns: Sequence[str]) -> None:
        """Count a trial that just finished."""
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
            self.last_line = time.monotonic()
        else:
            self.bar.update()
            self._postfix()

    def tick(self, running: int) -> None:
        """Between trials: refresh the bar, or in a log say what runs once a quiet minute."""
        if not self.bar.disable:
            self.bar.refresh()
            return
        now = time.monotonic()
        if now - self.last_line >= self.heartbeat_s:
            print(
                f"{running} trials running, {sum(self.counts.values())}/{self.total} finished, "
                f"{_minutes(now - self.started)} since the study started",
                flush=True,
            )
            self.last_line = now

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


def _minutes(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"
