"""Real Ray nodes on this machine for the cluster tests: a head and worker nodes, each its own
`ray start --block` with its own temp dir and ports, watched and stopped through its own session.

Ray gives each worker process a process group of its own, but it stays in the session of the
`ray start` that started its raylet. So a node's processes are its session, and stopping or
killing a node means every process group in that session (never a machine-wide `ray stop`).
Only the public surfaces are used: `ray start`, the dashboard's state and job APIs (what
`ray list` and `ray job list` ask), `ray job submit`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")

# Titles of processes that every node runs for Ray itself, not for a job.
RAY_OWN_TITLES = {"ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::JobSupervisor"}


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now (held open together, so none repeats)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def ray_env() -> dict[str, str]:
    """The environment of every Ray command here: no authentication (a local test cluster), this
    venv's `python` first on PATH (a job's entrypoint runs with the head's PATH)."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    # Set for a single-node Ray (Ray then binds 127.0.0.1 only); a multi-node Ray refuses it.
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    return env


def token_env(home: Path) -> dict[str, str]:
    """ray_env with Ray's token authentication on (RAY_AUTH_MODE=token), a fresh token given in
    RAY_AUTH_TOKEN, and `home` as HOME, so that the real ~/.ray is never read nor written; the
    caches of the numba kernels and of matplotlib stay the user's (XDG_CACHE_HOME)."""
    return {
        **ray_env(),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "HOME": str(home),
        "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"),
    }


def without_token(env: dict[str, str]) -> dict[str, str]:
    """`env` as a client that was never given the cluster's token (nor told to use one)."""
    return {**{k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}, "RAY_AUTH_MODE": "disabled"}


def _wait_until(condition, timeout: float, what: str, interval: float = 0.5):
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s")
        time.sleep(interval)


@dataclass
class RayNode:
    """One `ray start --block` process and everything it started (its session)."""

    process: subprocess.Popen
    temp_dir: Path
    log: IO[str]
    node_id: str = ""

    def session(self) -> list[psutil.Process]:
        """Every live process of this node: the `ray start`, its raylet, agents and workers."""
        members = []
        for process in psutil.process_iter():
            with contextlib.suppress(OSError, psutil.Error):
                mine = os.getsid(process.pid) == self.process.pid
                if mine and process.status() != psutil.STATUS_ZOMBIE:
                    members.append(process)
        return members

    def busy_workers(self) -> list[str]:
        """Titles of this node's Ray workers that run a job's task or actor (`ray::<name>`)."""
        titles = []
        for process in self.session():
            with contextlib.suppress(psutil.Error):
                title = (process.cmdline() or [""])[0]
                if title.startswith("ray::") and title not in RAY_OWN_TITLES:
                    titles.append(title)
        return titles

    def kill(self) -> None:
        """Lose the node at once: SIGKILL every process group of its session, the `ray start`
        group (raylet, agents) first so that no new worker is started meanwhile."""
        self._signal_session(signal.SIGKILL)
        self.process.wait()
        _wait_until(lambda: not self.session(), 30, "the killed node's processes did not exit")

    def stop(self) -> None:
        """Stop the node the way Ctrl-C stops `ray start --block`; whatever outlives that by 30 s
        (workers have process groups of their own) is killed. Then its temp dir goes."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        with contextlib.suppress(TimeoutError):
            _wait_until(lambda: not self.session(), 10, "the stopped node's workers did not exit")
        if self.session():
            self.kill()
        self.process.wait()
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _signal_session(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)
        for _ in range(3):  # a worker forked while we looked joins the next round
            groups = set()
            for process in self.session():
                with contextlib.suppress(OSError):
                    groups.add(os.getpgid(process.pid))
            for group in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signum)


def _start_node(args: list[str], env: dict[str, str], hide: Path | None = None) -> RayNode:
    """`ray start --block <args>` in a session of its own; where `hide` is given, in a mount
    namespace of its own where that folder is an empty read-only one (`hiding`)."""
    # Short: Ray's socket paths must stay under 108 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    # Ray's temp dir is <temp_dir>/ray, where `ray start` notes the cluster's address: a
    # process with RAY_TMPDIR=<temp_dir> finds this node's cluster as `auto` (`auto_env`).
    ray_temp_dir = temp_dir / "ray"
    ray_temp_dir.mkdir()
    node_manager, object_manager, agent_http, agent_grpc, runtime_env, metrics = free_ports(6)
    command = [
        RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={ray_temp_dir}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
        # 0: each worker binds a port the OS picks, so two nodes on one machine never collide.
        "--min-worker-port=0", "--max-worker-port=0", *args,
    ]  # fmt: skip
    if hide is not None:
        command = [*hiding(hide), *command]
    log = open(temp_dir / "ray-start.log", "w")  # noqa: SIM115 - open for the node's lifetime
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    return RayNode(process, temp_dir, log)


def hiding(folder: Path) -> list[str]:
    """A command prefix that runs the command in a mount namespace of its own, where `folder`
    is an empty, read-only file system: what is there for every other process (on the same
    disk) can be neither read nor written, as on another machine. Needs root."""
    mount = 'mount -t tmpfs -o ro,size=1m echo-hidden "$0" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(folder)]


def missing_hiding() -> str | None:
    """Why `hiding` cannot work here, or None."""
    try:
        done = subprocess.run([*hiding(Path(tempfile.gettempdir())), "true"], check=False,
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    except OSError as error:
        return f"cannot hide a folder from a node: {error}"
    if done.returncode != 0:
        return f"cannot hide a folder from a node (needs root): {done.stderr.strip()}"
    return None


@dataclass
class RayCluster:
    """A head of our own on this machine, reached through its dashboard (jobs, state API)."""

    head: RayNode
    gcs_address: str
    dashboard: str
    env: dict[str, str] = field(default_factory=ray_env)

    @classmethod
    def start(cls, num_cpus: int = 1, env: dict[str, str] | None = None) -> RayCluster:
        """Start a head with `num_cpus` CPUs and wait until its job and state APIs answer.
        `env`: the environment of the head and of every Ray command sent to it (ray_env's by
        default, without authentication)."""
        env = env or ray_env()
        gcs, dashboard, client = free_ports(3)
        head = _start_node(
            ["--head", f"--port={gcs}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={client}"],
            env,
        )  # fmt: skip
        cluster = cls(head, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", env)
        try:
            head.node_id = cluster._wait_for_node(head, is_head=True, known=set())
            _wait_until(lambda: cluster._answers("/api/jobs/"), 90,
                        "the head's job API did not answer")  # fmt: skip
        except BaseException:
            head.stop()
            raise
        return cluster

    def add_worker_node(self, num_cpus: int = 1, hide: Path | None = None) -> RayNode:
        """Join a worker node with `num_cpus` CPUs, its own temp dir and ports, to which the
        folder `hide` is an empty read-only one (`hiding`); wait until the head lists it
        ALIVE."""
        known = {node["node_id"] for node in self.list_state("nodes")}
        args = [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}"]
        node = _start_node(args, self.env, hide)
        try:
            node.node_id = self._wait_for_node(node, is_head=False, known=known)
        except BaseException:
            node.stop()
            raise
        return node

    def stop(self) -> None:
        self.head.stop()

    def auto_env(self) -> dict[str, str]:
        """The environment in which Ray's own lookup of the latest cluster on this machine
        (`--address auto`) finds this head, and no other: Ray reads the address that `ray
        start` noted in $RAY_TMPDIR/ray, the head's temp dir here."""
        return {**self.env, "RAY_TMPDIR": str(self.head.temp_dir)}

    def list_state(self, kind: str) -> list[dict]:
        """What `ray list <kind> --detail` lists (nodes, jobs, tasks, actors), as dicts: asked of
        the dashboard's state API over HTTP, as that command does, without starting a Python
        that imports Ray for every call (seconds each on a loaded machine)."""
        listed = self._get(f"/api/v0/{kind}?limit=10000&detail=true")
        if listed["result"] is False:
            raise RuntimeError(f"the state API refused to list {kind}: {listed['msg']}")
        return listed["data"]["result"]["result"]

    def _get(self, path: str) -> dict:
        """GET the dashboard's `path` as JSON, with the cluster's token where it has one."""
        headers = {}
        if self.env.get("RAY_AUTH_MODE") == "token":
            headers["Authorization"] = f"Bearer {self.env['RAY_AUTH_TOKEN']}"
        request = urllib.request.Request(self.dashboard + path, headers=headers)
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)

    def _answers(self, path: str) -> bool:
        try:
            self._get(path)
        except (OSError, ValueError):  # not listening yet, or not yet serving JSON
            return False
        return True

    def wait_for_node_state(self, node_id: str, state: str, timeout: float = 60) -> None:
        """Wait until the head lists the node in `state` (a lost node is marked DEAD once its
        health checks have failed for some seconds)."""

        def reached() -> bool:
            return any(n["node_id"] == node_id and n["state"] == state
                       for n in self.list_state("nodes"))  # fmt: skip

        _wait_until(reached, timeout, f"node {node_id[:8]} was not listed {state}", interval=1)

    def job(self, submission_id: str) -> dict:
        """The job's record: `job_id` (hex, as tasks and actors carry it), `status`, ..."""
        return next(j for j in self.list_state("jobs") if j["submission_id"] == submission_id)

    def nodes_with_cpu_work(self, job_id: str) -> set[str]:
        """Nodes where the job ran something that holds CPUs: a task or an actor (trainers may
        be either), whatever its name."""
        tasks = [t for t in self.list_state("tasks")
                 if t["type"] == "NORMAL_TASK" and t["job_id"] == job_id]  # fmt: skip
        actors = [a for a in self.list_state("actors") if a["job_id"] == job_id]
        return {
            placed["node_id"]
            for placed in tasks + actors
            if _cpus(placed.get("required_resources") or {}) > 0 and placed.get("node_id")
        }

    def submit(self, submission_id: str, repo: Path, *entrypoint: str, **popen) -> subprocess.Popen:
        """`ray job submit --working-dir <repo> -- <entrypoint>` in a session of its own; it
        follows the job's log until the job ends."""
        command = [RAY, "job", "submit", "--address", self.dashboard, "--submission-id",
                   submission_id, "--working-dir", str(repo), "--", *entrypoint]  # fmt: skip
        return subprocess.Popen(command, env=self.env, text=True, start_new_session=True, **popen)

    def _wait_for_node(self, node: RayNode, is_head: bool, known: set[str]) -> str:
        def alive_node_id() -> str | None:
            assert node.process.poll() is None, _exited(node)
            try:
                entries = self.list_state("nodes")
            except (OSError, ValueError, RuntimeError):
                return None  # the dashboard is not up yet
            for entry in entries:
                fresh = entry["node_id"] not in known and entry["state"] == "ALIVE"
                if fresh and entry["is_head_node"] == is_head:
                    return entry["node_id"]
            return None

        return _wait_until(alive_node_id, 90, "the Ray node was not listed ALIVE", interval=1)


def _cpus(resources: dict[str, float]) -> float:
    # Placement groups rename the resource (CPU_group_...): count those too.
    return sum(amount for name, amount in resources.items() if name.startswith("CPU"))


def _exited(node: RayNode) -> str:
    node.log.flush()
    return f"`ray start` exited while starting:\n{(node.temp_dir / 'ray-start.log').read_text()}"
