"""Running the pipeline as a user does, from the benchmark scripts: its public surfaces only.

Every measured run is a fresh Python process started from the repository root with this
checkout first on its path, so that the pipeline measured is the one next to this script (not
an installed copy), each run starts and stops its own embedded Ray, and its wall time counts
everything a user waits for: interpreter start, imports, Ray, training, writing, the summary.
Results are read back through the results layout: `steps/` with pyarrow, the journal with
Optuna.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from report import say
from this_checkout import ROOT

# A run that takes longer than this has hung (the longest, 100,000 tiny trials, takes minutes).
RUN_TIMEOUT_S = 4 * 3600


@dataclass(frozen=True)
class ChildRun:
    """A finished child process: its wall time, from launch to exit, and what it printed."""

    seconds: float
    stdout: str


class ChildFailed(RuntimeError):
    """A measured run exited with an error: the benchmark's numbers would mean nothing."""


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a measured run: Ray embedded (no RAY_ADDRESS) without token
    authentication, as other local Ray instances here run, and this checkout first on the path."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "disabled"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def fresh_caches(folder: Path) -> dict[str, str]:
    """Environment that points every compiled-kernel cache the pipeline may use at empty
    folders under `folder`: torch.compile's (inductor, and triton's on a GPU) and numba's. The
    same folder a second time is a warm machine."""
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(folder / "torchinductor"),
        "TRITON_CACHE_DIR": str(folder / "triton"),
        "NUMBA_CACHE_DIR": str(folder / "numba"),
    }


def run_child(argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> ChildRun:
    """Run `argv` from the repository root, stderr to `log`; raise ChildFailed, with the tail of
    the log, when it fails."""
    started = time.perf_counter()
    with open(log, "ab") as err:
        done = subprocess.run(
            list(argv),
            cwd=ROOT,
            env=child_env(env),
            stdout=subprocess.PIPE,
            stderr=err,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
    seconds = time.perf_counter() - started
    stdout = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise ChildFailed(
            f"{' '.join(argv[:6])} ... exited {done.returncode}; the end of {log}:\n"
            + "\n".join(tail)
        )
    return ChildRun(seconds, stdout)


def run_study_cli(
    config: Path,
    output: Path,
    log: Path,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> ChildRun:
    """`python -m pipeline study CONFIG --output OUTPUT [--set ...]`, timed from launch to exit."""
    sets = [arg for override in overrides for arg in ("--set", override)]
    argv = [sys.executable, "-m", "pipeline", "study", str(config), "--output", str(output), *sets]
    say(f"  $ python -m pipeline study {config.name} --output {output} {' '.join(sets)}".rstrip())
    return run_child(argv, log, env)


def write_config(path: Path, raw: Mapping[str, Any]) -> Path:
    """Write a study config as YAML; dotted search keys stay strings."""
    path.write_text(yaml.safe_dump(dict(raw), sort_keys=False))
    return path


def last_json_line(text: str) -> dict[str, Any]:
    """The JSON object a child printed as its last line of stdout."""
    return json.loads(text.strip().splitlines()[-1])


def steps_rows(output: Path) -> int:
    """Rows of every Parquet file under `output`/steps, read from their footers."""
    import pyarrow.dataset as ds

    return ds.dataset(output / "steps", format="parquet").count_rows()


def visible_files(folder: Path) -> int:
    """Files under `folder` that readers see (pyarrow and pandas skip names that start with a
    dot or an underscore: temporary files)."""
    return sum(
        1 for _, _, names in os.walk(folder) for name in names if not name.startswith((".", "_"))
    )


def load_journal_trials(output: Path, study_name: str, storage_url: str | None = None) -> list:
    """The study's trials, from the Optuna journal in its output (or the storage at
    `storage_url`, opened as the pipeline opens it), as Optuna reads them."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage_url:
        from pipeline.study.optuna_setup import open_storage

        storage = open_storage(storage_url, study_name)
    else:
        storage = JournalStorage(JournalFileBackend(str(output / "study.journal")))
    return optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)


@contextmanager
def work_folder(prefix: str, keep: bool) -> Iterator[Path]:
    """A fresh folder for a benchmark's runs: removed at the end unless `keep`; a child run
    that fails ends the script with its error, and the folder stays for a look."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    except ChildFailed as error:
        sys.exit(f"error: {error}\n(outputs kept in {folder})")
    if keep:
        say(f"outputs kept in {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
