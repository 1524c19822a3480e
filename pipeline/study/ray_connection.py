"""Ray embedded in the driver's process: started for a study on one machine, stopped after it.

Ray's own `ray.init()` and `ray.shutdown()`, less the waits and processes that a short study on
one machine pays for in full (measured on two cores, where a 48-trial first study takes 6-8 s in
all):

- **Start.** `ray.init` waits for this node's raylet to register with the GCS by asking the GCS
  for the node, and Ray's C++ client, when the node is not there yet, retries only after a whole
  second. The raylet registers about 0.6 s after it starts, so every start lost 0.4 to 1.4 s
  (ray.init took 2.3 or 3.3 s). `_waiting_for_the_node_briskly` polls the GCS every 20 ms first.
- **The object store.** The raylet starts its object store in a thread and connects to it at
  once; when the store's socket is not there yet, the client retries only after
  `raylet_client_connect_timeout_milliseconds` (1 s), which about every other start hit. Here
  it retries every 20 ms, for as long in all (10 s) as Ray's defaults.
- **Processes a study does not use.** `ray.init` starts, before the raylet, an API server (the
  dashboard's Python process, which serves the job and state APIs and the dashboard itself),
  and waits until it is up, and the autoscaler's monitor. A study on one machine submits no
  jobs and has nothing to autoscale: without them Ray starts in 1.2-1.3 s rather than 1.9-3.3,
  and about 1.2 s of CPU less goes to Ray's own start on cores the trainers are waiting for.
  With `ray.dashboard: true` the API server starts as usual.
- **What only a dashboard reads.** Without the dashboard, nothing reads the metrics that Ray's
  processes record and send to the dashboard agent, nor the node stats that the agent gathers
  every 5 s: Ray records no metrics then (`enable_metrics_collection`), and the agent gathers its
  stats once a minute. Its log monitor, which forwards the workers' output to the driver (a
  trainer's warnings), looks for new log files every 0.5 s instead of 10 times a second. During
  a 2-worker `configs/study.yaml` at 2 epochs, the agent, the log monitor, the raylet and the
  GCS took 3.6 % of a core while the trainers trained, 2.4 % with these settings
  (bench/cpu_split.py; docs/benchmarks.md).
- **Stop.** `ray.shutdown` stops the GCS before the autoscaler monitor, whose SIGTERM handler
  then blocks on telling the GCS until Ray kills it a second later (1.0 of the 1.4 s that the
  stop took). Where a monitor runs, it is killed first.

Where these reach into Ray's private API (`ray._private`) and it differs from what they expect
(an upgrade of Ray), they do nothing and Ray starts and stops as it does on its own, only
slower.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

import ray

from pipeline.config import Config, ConfigError, first_line
from pipeline.study.launch import Launch
from pipeline.study.trainer import gpus_per_trainer

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
REGISTRATION_POLL_S = 0.02
REGISTRATION_TIMEOUT_S = 30.0  # as long as Ray itself waits for a raylet to register


# The raylet's connection to its object store (and a worker's to its raylet): Ray's defaults
# are 10 attempts 1 s apart.
CONNECT_RETRY = {
    "raylet_client_connect_timeout_milliseconds": 20,
    "raylet_client_num_connect_attempts": 500,
}


# Without the dashboard: no metrics recorded (see the module's docs).
NO_DASHBOARD_SYSTEM_CONFIG = {"enable_metrics_collection": False}
# Without the dashboard, for the processes Ray starts (they read these when they start): the
# agent's node stats once a minute rather than every 5 s (what the dashboard shows); the log
# monitor's search for new log files every LOG_NAME_UPDATE_INTERVAL_S (0.5 s) rather than on
# each of its 0.1 s polls, which it does below this many files.
NO_DASHBOARD_ENVIRONMENT = {
    "REPORTER_UPDATE_INTERVAL_MS": "60000",
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
}


def start_embedded_ray(num_cpus: int | None, dashboard: bool) -> None:
    """Start a Ray of this process's own on this machine (even where `ray start` runs one):
    without an API server unless `dashboard`, and without an autoscaler; without the
    dashboard, without what only it reads (see the module's docs)."""
    system_config = {**CONNECT_RETRY, **({} if dashboard else NO_DASHBOARD_SYSTEM_CONFIG)}
    with (
        _waiting_for_the_node_briskly(),
        _starting_only_what_a_study_uses(dashboard),
        _on_loopback_only(),
        _environment({} if dashboard else NO_DASHBOARD_ENVIRONMENT),
    ):
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host=LOOPBACK,
            configure_logging=True,
            logging_level=logging.WARNING,
            _system_config=system_config,
        )


def stop_embedded_ray() -> None:
    """ray.shutdown, an autoscaler monitor killed first (see the module's docs)."""
    node = getattr(ray._private.worker, "_global_node", None)
    with contextlib.suppress(Exception):
        monitor = ray._private.ray_constants.PROCESS_TYPE_MONITOR
        node._kill_process_type(monitor, check_alive=False)
    ray.shutdown()


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """While Ray starts, these environment variables, which the processes it starts inherit
    (a value the user set is kept); this process's environment is put back after."""
    added = {name: value for name, value in variables.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@contextlib.contextmanager
def _on_loopback_only() -> Iterator[None]:
    """While Ray starts, it takes this machine for a single-node Ray, whose node address is
    127.0.0.1: the GCS, the raylet, the agents and every worker (the driver included) then
    listen on the loopback interface only, whichever entry point started Ray.

    Ray decides this from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, but reads it once, when `ray` is
    first imported (`ray_constants.ENABLE_RAY_CLUSTER`), which from Python is before any study
    code runs; and `ray.init(_node_ip_address="127.0.0.1")` is turned back into this machine's
    network address while that constant is true. So the constant itself is set for the start."""
    constants = getattr(ray._private, "ray_constants", None)
    if not hasattr(constants, "ENABLE_RAY_CLUSTER"):
        yield  # Ray's private API changed: test_study's loopback test says so
        return
    original = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = original


@contextlib.contextmanager
def _starting_only_what_a_study_uses(dashboard: bool) -> Iterator[None]:
    """While Ray starts, its node starts no autoscaler monitor, and no API server unless
    `dashboard`."""
    node_class = getattr(getattr(ray._private, "node", None), "Node", None)
    skipped = ["start_monitor", *([] if dashboard else ["start_api_server"])]
    if node_class is None or not all(hasattr(node_class, name) for name in skipped):
        yield
        return
    originals = {name: getattr(node_class, name) for name in skipped}

    def skip(*args: object, **kwargs: object) -> None:
        return None

    for name in skipped:
        setattr(node_class, name, skip)
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(node_class, name, method)


@contextlib.contextmanager
def _waiting_for_the_node_briskly() -> Iterator[None]:
    """While Ray starts, have its wait for this node's registration poll the GCS every 20 ms
    before it asks for the node in its own way, which then finds it at once."""
    services = getattr(ray._private, "services", None)
    ask_for_node = getattr(services, "get_node", None)
    if ask_for_node is None:
        yield
        return

    def get_node(gcs_address: str, node_id: str):  # ray._private.services.get_node's signature
        try:
            wait_until_registered(gcs_address, node_id, REGISTRATION_TIMEOUT_S)
        except Exception as error:  # Ray's private API changed: Ray's own wait still works
            log.debug("cannot poll the GCS for this node (%s); Ray waits as it does", error)
        return ask_for_node(gcs_address, node_id)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = ask_for_node


def wait_until_registered(gcs_address: str, node_id: str, timeout: float) -> bool:
    """Poll the GCS at `gcs_address` every 20 ms until the node `node_id` (hex) has registered,
    for up to `timeout` seconds; whether it has."""
    from ray._raylet import GcsClient, NodeID

    client = GcsClient(address=gcs_address)
    wanted = NodeID.from_hex(node_id)
    deadline = time.monotonic() + timeout
    while wanted not in client.get_all_node_info(timeout=5):
        if time.monotonic() >= deadline:
            return False
        time.sleep(REGISTRATION_POLL_S)
    return True


def stop_in_background(embedded: bool) -> threading.Thread:
    thread = threading.Thread(target=stop_embedded_ray if embedded else lambda: None, daemon=True)
    thread.start()
    return thread


def trainer_asks(config: Config) -> dict[str, tuple[float, str]]:
    """What each trainer asks of one node, by Ray resource: (amount, the setting that asks it,
    e.g. `ray.cpus_per_trainer = 3` or, for GPUs derived from it, `train.device = 'cuda'`)."""
    cpus = config.ray.cpus_per_trainer
    asks = {"CPU": (float(cpus), f"ray.cpus_per_trainer = {cpus}")}
    gpus = gpus_per_trainer(config)
    if gpus > 0:
        derived = config.ray.gpus_per_trainer is None
        key = f"train.device = {config.train.device!r}" if derived else "ray.gpus_per_trainer"
        asks["GPU"] = (gpus, key if derived else f"{key} = {gpus:g}")
    return asks


def describe_asks(config: Config) -> str:
    """What a trainer asks of Ray, in words: '1 CPU (ray.cpus_per_trainer = 1)'."""
    asks = trainer_asks(config).items()
    return " and ".join(f"{amount:g} {name} ({why})" for name, (amount, why) in asks)


def trainers_that_fit(config: Config) -> int:
    """Trainers the cluster's live nodes can hold at once, each on one node."""
    asks = trainer_asks(config)
    return sum(
        int(min(node.get(name, 0.0) // amount for name, (amount, _) in asks.items()))
        for node in _node_resources()
    )


def check_placement(config: Config, embedded: bool) -> None:
    """Refuse a study whose trainer fits on no node, before anything is written: its trainers
    would wait for Ray forever. Ray embedded here has all the nodes it will have; on a cluster a
    node may still join (an autoscaler's), so the study waits for one up to
    ray.placement_timeout_s, saying what it waits for."""
    shortfall = _shortfall(config)
    if shortfall is not None and not embedded:
        timeout = config.ray.placement_timeout_s
        log.warning("%s; waiting up to %g s (ray.placement_timeout_s) for a node that has them "
                    "to join", shortfall, timeout)  # fmt: skip
        deadline = time.monotonic() + timeout
        while shortfall is not None and time.monotonic() < deadline:
            time.sleep(1.0)
            shortfall = _shortfall(config)
        if shortfall is not None:
            shortfall += f"; none joined in {timeout:g} s (ray.placement_timeout_s)"
    if shortfall is not None:
        raise ConfigError(shortfall)


def _shortfall(config: Config) -> str | None:
    """Why no live node can hold a trainer, in one line naming the setting, what it asks and
    what the largest node has; None when one can."""
    nodes = _node_resources()
    asks = trainer_asks(config)
    if any(all(node.get(name, 0.0) >= amount for name, (amount, _) in asks.items())
           for node in nodes):  # fmt: skip
        return None
    for name, (amount, why) in asks.items():
        largest = max((node.get(name, 0.0) for node in nodes), default=0.0)
        if amount > largest:
            return (
                f"{why}: a trainer asks {amount:g} {name} of one node, but the largest node "
                f"has {largest:g} {name}"
            )
    return f"a trainer asks {describe_asks(config)} of one node, but no node has them all"


def _node_resources() -> list[dict[str, float]]:
    """The total resources of each live node (ray.cluster_resources sums them over nodes)."""
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def connect_ray(config: Config, launch: Launch) -> bool:
    """Join the cluster `launch` names, or start Ray embedded; True when this call started
    Ray (and the study stops it). A Ray this process already runs is used as it is."""
    address = launch.address
    if address is not None:
        _check_reachable(address)
    if ray.is_initialized():
        return False
    if address is None:
        start_embedded_ray(config.ray.num_cpus, config.ray.dashboard)
        return True
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ConfigError(_no_cluster(address, first_line(error))) from None
    return False


def _check_reachable(address: str) -> None:
    """Fail fast, and say how to start a cluster, when nothing listens at the address (Ray
    itself would retry for minutes)."""
    target = address
    if address == "auto":
        # What Ray would join: the cluster last started on this machine (a private helper of
        # Ray's, so without it Ray's own search decides).
        try:
            target = ray._private.services.canonicalize_bootstrap_address("auto")
        except ConnectionError as error:
            raise ConfigError(_no_cluster(address, first_line(error))) from None
        except (AttributeError, TypeError):
            return
    host, colon, port = target.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit() or "/" in host:
        raise ConfigError(
            f"ray.address = {address!r}: expected auto, host:port or ray://host:port "
            "(the GCS address that `ray start --head` prints, not the dashboard's http:// URL)"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as error:
        raise ConfigError(_no_cluster(address, f"{target}: {first_line(error)}")) from None
    if not target.startswith("ray://"):
        _check_admitted(address, f"{host}:{port}")


def _check_admitted(address: str, gcs: str) -> None:
    """Ask the cluster's GCS for its id, as `ray.init` first does, and fail fast, naming the
    token, when it refuses this client: a head with token authentication (RAY_AUTH_MODE=token)
    answers a client without its token `UNAUTHENTICATED`, which `ray.init` retries for 15 s
    and then reports as a failed connection. Ray's own gRPC channel adds the token when this
    client has one (a private helper of Ray's: without it, or on any other answer, `ray.init`
    decides)."""
    try:
        import grpc
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return
    channel = init_grpc_channel(gcs)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=10)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise ConfigError(
                f"ray.address = {address!r}: the cluster refused this client "
                f"({first_line(error.details() or 'unauthenticated')}); it uses token "
                "authentication: set RAY_AUTH_MODE=token and give this client the cluster's "
                "token (RAY_AUTH_TOKEN, or ~/.ray/auth_token)"
            ) from None
    finally:
        channel.close()


def _no_cluster(address: str, reason: str) -> str:
    return (
        f"ray.address = {address!r}: no Ray cluster answers there ({reason}); start one with "
        "`ray start --head`, or leave ray.address unset to run Ray embedded"
    )
