"""The results folder: Arrow schemas, atomic Parquet writes, and loaders for pandas.

An output is a local folder or any URI that pyarrow.fs understands (file://, s3://, gs://, ...):

    <output>/config.yaml        the resolved config
    <output>/steps/trials-0000042-17.parquet   the steps of trials recorded together (here 17,
                                the first numbered 42), so that files do not grow one per trial
    <output>/trials.parquet     one row per trial
    <output>/summary.parquet, summary.md, plots/*.png

Nothing half-written is ever visible: on a local disk a file is written under a hidden
temporary name (pyarrow and pandas skip names starting with "."), flushed, and renamed into
place; on an object store a PUT appears whole or not at all.
"""

from __future__ import annotations

import fcntl
import io
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from pipeline.config import Config, ConfigError, config_from_dict, first_line
from pipeline.results.failpoints import failpoint
from pipeline.results.object_store import check_object_store

STEPS = "steps"
TRIALS = "trials.parquet"
CONFIG = "config.yaml"
LOCK = ".study.lock"


class Output:
    """One results folder, local or remote, addressed by names relative to its root."""

    def __init__(self, location: str) -> None:
        self.location = location
        if "://" in location:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(location)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
                raise ConfigError(f"output {location}: {first_line(error)}") from None
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(location)
        self.root = self.root.rstrip("/")

    @property
    def is_local(self) -> bool:
        return self.fs.type_name == "local"

    def path(self, *names: str) -> str:
        return "/".join([self.root, *names])

    def exists(self, *names: str) -> bool:
        return self.fs.get_file_info(self.path(*names)).type != pafs.FileType.NotFound

    def read_text(self, *names: str) -> str:
        with self.fs.open_input_stream(self.path(*names)) as stream:
            return stream.read().decode()

    def write_bytes(self, name: str, data: bytes, replace: bool = True) -> None:
        """Write a whole file so that no reader ever sees part of it. Without `replace`, a
        file already there raises FileExistsError and is left as it was."""
        target = self.path(name)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if not replace and self.exists(name):  # on a local disk, os.link checks it again
            raise FileExistsError(f"{target} exists: it is never overwritten")
        if not self.is_local:
            # An object appears when its stream closes: a writer killed before has written
            # nothing. The data goes in one call, so that no error can leave a part of it to
            # be published when the stream is closed (or collected).
            with self.fs.open_output_stream(target) as stream:
                stream.write(data)
                failpoint(f"writing {name.split('/')[0]}")
            return
        temporary = f"{parent}/.{target.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
        try:
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            if replace:
                os.replace(temporary, target)
            else:
                os.link(temporary, target)  # fails if the name exists, even by a race
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    def write_table(self, name: str, table: pa.Table, replace: bool = True) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.write_bytes(name, buffer.getvalue(), replace)

    def check_writable(self) -> None:
        """Raise ConfigError, writing nothing, when this output cannot be a results folder here:
        a file in its place, or a local folder (or the nearest existing parent) not writable;
        on an object store, no credentials, endpoint or bucket (`check_object_store`)."""
        if not self.is_local:
            check_object_store(self.fs, self.root, self.location)
        info = self.fs.get_file_info(self.root)
        if info.type == pafs.FileType.File:
            raise ConfigError(
                f"output {self.location} is a file, not a folder: choose a folder for --output"
            )
        if not self.is_local:
            return
        existing = self.root
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ConfigError(f"output {self.location}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"output {self.location}: {existing} is not writable by this user")

    def check_free(self) -> None:
        """Refuse at once, before starting anything, an output another study is running into."""
        if self.is_local and self.exists(LOCK):
            with self.lock():
                pass

    @contextmanager
    def lock(self, only_writer: bool = False) -> Iterator[None]:
        """Hold this output for one study alone: a second study into it is refused, not mixed
        in. On a local disk the lock is an flock, which dies with its process, so a killed
        driver never leaves it behind. An object store has no such lock: a study there runs
        only when told it is the only writer (`only_writer`), else it is refused."""
        if not self.is_local:
            if not only_writer:
                raise ConfigError(
                    f"output {self.location}: a remote output cannot be locked against a "
                    "second study writing into it; --set study.only_writer=true if no other "
                    "study writes there, or use a local or mounted folder"
                )
            yield
            return
        try:
            os.makedirs(self.root, exist_ok=True)
            lock = open(self.path(LOCK), "a+")  # noqa: SIM115 (closed below, after the study)
        except OSError as error:
            raise ConfigError(_cannot_create(self, error)) from None
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    f"output {self.location} is in use by another running study; wait for it "
                    "to finish or choose another --output"
                ) from None
            yield


def read_config(output: Output) -> Config | None:
    """The config an output was made with (its config.yaml), or None when it has none; an
    unreadable one raises ConfigError in one line."""
    if not output.exists(CONFIG):
        return None
    try:
        return config_from_dict(yaml.safe_load(output.read_text(CONFIG)), output.path(CONFIG))
    except (ConfigError, yaml.YAMLError, UnicodeDecodeError) as error:
        message = str(error).splitlines()[0]
        raise ConfigError(f"{output.path(CONFIG)}: unreadable ({message}); move it away") from None


def check_output(output: Output, config: Config) -> None:
    """Raise ConfigError, writing nothing, if `output` holds another config's results or is not
    an echo-study output at all."""
    previous = read_config(output)
    if previous is not None:
        differing = config.differences(previous)
        if differing:
            key = differing[0]
            raise ConfigError(
                f"output {output.location} holds results of another config ({key}: "
                f"{previous.value(key)!r} there, {config.value(key)!r} here); "
                "choose another --output or remove that folder"
            )
    elif output.exists() and _has_entries(output):
        raise ConfigError(
            f"output {output.location} exists and is not an echo-study output (no {CONFIG}); "
            "choose another --output"
        )


def claim_output(output: Output, config: Config) -> None:
    """Make `output` this config's: check it (see check_output), then write config.yaml."""
    check_output(output, config)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    try:
        output.write_bytes(CONFIG, text.encode())
    except OSError as error:
        raise ConfigError(_cannot_create(output, error)) from None


def _cannot_create(output: Output, error: OSError) -> str:
    reason = error.strerror or str(error).splitlines()[0]
    return f"output {output.location} cannot be created here ({reason}); choose another --output"


def _has_entries(output: Output) -> bool:
    """Whether the folder holds anything but hidden files (such as a study's lock)."""
    infos = output.fs.get_file_info(pafs.FileSelector(output.root))
    return any(not info.base_name.startswith(".") for info in infos)
