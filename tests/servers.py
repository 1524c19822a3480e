"""Real servers on this machine for the production tests: a PostgreSQL 15 server and moto's S3
server, each a process of its own on 127.0.0.1 and a free port, started once per test session
and stopped by whoever started it, through its own process group (never a machine-wide kill).

PostgreSQL refuses to run as root, and CI runs as root: the server runs as the `postgres` user,
in a data folder that user owns under /tmp (pytest's own temp folders are closed to other
users). Its unix socket lives in that folder too, so that it never meets another server's.
Clients connect over TCP: `trust` for the test user, a password for `echo_password`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.ray_nodes import free_ports

POSTGRES_USER = "postgres"
# The role tests connect as without a password, and the one that needs its password.
TEST_ROLE = "echo"
PASSWORD_ROLE = "echo_password"
PASSWORD = "right-password"
# moto accepts any key; pyarrow and the AWS SDK need one to sign requests.
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
# Never ask the EC2 instance metadata service (an address off this machine) for credentials
# or a region: the SDK would try it when the environment has none.
S3_QUIET = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"}
START_SECONDS = 60


def postgres_bin_dir() -> Path | None:
    """The folder of `initdb` and `postgres`: on the PATH, or Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


def moto_server_bin() -> Path | None:
    """moto's standalone S3 server, next to this Python or on the PATH."""
    beside = Path(sys.executable).parent / "moto_server"
    if beside.exists():
        return beside
    found = shutil.which("moto_server")
    return Path(found) if found else None


def missing_postgres() -> str | None:
    """Why a PostgreSQL server cannot be started here, or None when it can."""
    if postgres_bin_dir() is None:
        return "PostgreSQL's initdb is neither on the PATH nor in /usr/lib/postgresql/*/bin"
    try:
        pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        return f"no {POSTGRES_USER!r} user to run PostgreSQL as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    return None


def missing_moto() -> str | None:
    """Why moto's S3 server cannot be started here, or None when it can."""
    if moto_server_bin() is None:
        return "moto_server is not installed (pip install 'moto[server]')"
    return None


def _stop_group(process: subprocess.Popen, first: int, grace: float) -> None:
    """Signal the process group a server was started in, then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, first)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _wait_for(condition, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while not condition():
        if process.poll() is not None:
            tail = log.read_text()[-2000:]
            raise RuntimeError(f"{what} exited with {process.returncode}: {tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not start within {START_SECONDS} s")
        time.sleep(0.1)


@dataclass
class PostgresServer:
    """A PostgreSQL server of our own: its data folder, its port, its `postgres` process."""

    folder: Path
    port: int
    process: subprocess.Popen
    bin_dir: Path

    @classmethod
    def start(cls) -> PostgresServer:
        bin_dir = postgres_bin_dir()
        user = pwd.getpwnam(POSTGRES_USER)
        folder = Path(tempfile.mkdtemp(prefix="echo-postgres-"))
        os.chown(folder, user.pw_uid, user.pw_gid)
        data = folder / "data"
        as_postgres = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "cwd": folder}
        env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "LANG": "C.UTF-8"}
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", POSTGRES_USER, "--auth=trust",
             "--no-sync", "--encoding=UTF8"],
            check=True, capture_output=True, env=env, **as_postgres,
        )  # fmt: skip
        # The first matching line decides: the password role must give its password.
        (data / "pg_hba.conf").write_text(
            f"local all all trust\n"
            f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
            f"host all all 127.0.0.1/32 trust\n"
        )
        (port,) = free_ports(1)
        log = folder / "server.log"
        with open(log, "wb") as out:
            # fsync off: a test server's data need not survive a machine crash, and the tests
            # measure the pipeline, not this disk.
            process = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                 "-k", str(folder), "-c", "fsync=off", "-c", "max_connections=60"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                **as_postgres,
            )  # fmt: skip
        server = cls(folder, port, process, bin_dir)
        _wait_for(server._answers, "PostgreSQL", process, log)
        server.sql(f"CREATE ROLE {TEST_ROLE} LOGIN SUPERUSER")
        server.sql(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{PASSWORD}' SUPERUSER")
        return server

    def _answers(self) -> bool:
        done = subprocess.run(
            [str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
            check=False,
        )
        return done.returncode == 0

    def sql(self, statement: str, database: str = "postgres") -> None:
        """Run one statement as the superuser, outside a transaction (CREATE DATABASE needs it)."""
        import psycopg

        with psycopg.connect(self.url(database, user=POSTGRES_USER), autocommit=True) as conn:
            conn.execute(statement)

    def url(self, database: str, user: str = TEST_ROLE, password: str | None = None) -> str:
        """A libpq URL of a database on this server (SQLAlchemy takes it with postgresql://)."""
        login = f"{user}:{password}" if password is not None else user
        return f"postgresql://{login}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh, empty database; its URL for the test role."""
        self.sql(f'CREATE DATABASE "{name}" OWNER {TEST_ROLE}')
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back sessions, then exit), then whatever is left."""
        _stop_group(self.process, signal.SIGINT, grace=20)
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class S3Server:
    """moto's S3 server: a real HTTP server that speaks the S3 API, on 127.0.0.1."""

    port: int
    process: subprocess.Popen
    log: Path

    @classmethod
    def start(cls) -> S3Server:
        (port,) = free_ports(1)
        log = Path(tempfile.mkstemp(prefix="echo-moto-", suffix=".log")[1])
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [str(moto_server_bin()), "-H", "127.0.0.1", "-p", str(port)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **S3_KEYS, **S3_QUIET},
            )  # fmt: skip
        server = cls(port, process, log)
        _wait_for(server._answers, "moto_server", process, log)
        return server

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client of this server needs in its environment: the endpoint and keys."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **S3_KEYS, **S3_QUIET}

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def filesystem(self):
        """A pyarrow S3 filesystem on this server, allowed to create buckets."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key=S3_KEYS["AWS_ACCESS_KEY_ID"],
            secret_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http",
            region=S3_QUIET["AWS_DEFAULT_REGION"],
            allow_bucket_creation=True,
        )

    def create_bucket(self, name: str) -> None:
        self.filesystem().create_dir(name)

    def stop(self) -> None:
        _stop_group(self.process, signal.SIGTERM, grace=10)
        self.log.unlink(missing_ok=True)


def refusing_port() -> int:
    """A port on 127.0.0.1 where nothing listens: a connection there is refused at once."""
    (port,) = free_ports(1)
    return port


@contextlib.contextmanager
def silent_server():
    """A port on 127.0.0.1 that accepts connections and never says a word: a server that does
    not answer."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]
