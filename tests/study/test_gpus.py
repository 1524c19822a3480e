"""GPUs through Ray: on this CPU machine, Ray's logical GPU resources stand in for real ones."""

import json
import os
import subprocess
import sys

import pytest

# A Ray of its own with two logical GPUs (the tests' shared Ray has none), in a subprocess.
SCRIPT = """
import json, sys
import ray
from pipeline.study.driver import run_study
from pipeline.study.launch import Launch
from pipeline.study.trainer import _gpu_from_ray, gpus_per_trainer, start_trainer
from pipeline.training.device import trains_on_cpu
from tests.conftest import study_config

from ray.core.generated import gcs_pb2


# Each Trainer actor Ray ever ran here, alive or dead: the GPUs it asked for, from the GCS's
# actor table (Ray's state API needs a dashboard).
def trainers_gpus():
    accessor = ray._private.state.state._connect_and_get_accessor()
    rows = [gcs_pb2.ActorTableData.FromString(row) for row in accessor.get_actor_table(None, None)]
    return {row.actor_id.hex(): row.required_resources.get("GPU", 0.0)
            for row in rows if row.class_name == "Trainer"}


ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="error")
config = study_config(__import__("pathlib").Path(sys.argv[1]), **{"study.trials": 2})
cuda = config.with_params({"train.device": "cuda"})
trainers = [start_trainer(cuda, Launch(None)) for _ in range(2)]
places = ray.get([t.where.remote() for t in trainers])
for trainer in trainers:
    ray.kill(trainer)
derived = {d: gpus_per_trainer(config.with_params({"train.device": d})) for d in ("auto", "cpu")}
on_cpu = ray.remote(lambda: {d: trains_on_cpu(d, _gpu_from_ray()) for d in ("auto", "cpu", "cuda")})
cpu_rule = {gpus: ray.get(on_cpu.options(num_gpus=gpus).remote()) for gpus in (0, 1)}
# auto on a cluster with GPUs asks for one; torch sees no CUDA here, so the trials train on
# the CPU, which shows the whole study runs with its trainers holding GPUs.
before = trainers_gpus()
outcome = run_study(config.with_params({"train.device": "auto"}), progress=False)
auto = [gpus for actor, gpus in trainers_gpus().items() if actor not in before]
# A fraction shares a GPU: its trainers ask Ray for half a GPU each.
before = trainers_gpus()
half = config.with_params({"train.device": "cpu", "ray.gpus_per_trainer": 0.5,
                           "output": sys.argv[1] + "/half"})
half_outcome = run_study(half, progress=False)
halves = [gpus for actor, gpus in trainers_gpus().items() if actor not in before]
print(json.dumps({"places": places, "derived": derived, "counts": outcome.counts,
                  "cpu_rule": [cpu_rule[0], cpu_rule[1]], "auto": auto,
                  "half": {"counts": half_outcome.counts, "gpus": halves}}))
"""


@pytest.fixture(scope="module")
def gpu_study(tmp_path_factory) -> dict:
    """What SCRIPT found, in a Ray of its own with two logical GPUs."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    folder = tmp_path_factory.mktemp("gpus")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_trainers_get_their_own_gpu_from_ray_and_torch_sees_only_it(gpu_study):
    result = gpu_study
    ids = [place["gpu_ids"] for place in result["places"]]
    # Each CUDA trainer holds one GPU of its own, and CUDA_VISIBLE_DEVICES names just it, so
    # torch's cuda:0 in that trainer is the GPU Ray gave it.
    assert sorted(map(tuple, ids)) == [("0",), ("1",)]
    for place in result["places"]:
        assert place["cuda_visible_devices"] == place["gpu_ids"][0]
    assert result["derived"] == {"auto": 1.0, "cpu": 0.0}
    # A trainer trains on the CPU, without torch, where asked to, or with `auto` when Ray gave
    # it no GPU: never on a GPU that Ray did not give it.
    without_gpu, with_gpu = result["cpu_rule"]
    assert without_gpu == {"auto": True, "cpu": True, "cuda": False}
    assert with_gpu == {"auto": False, "cpu": True, "cuda": False}
    assert result["counts"] == {"COMPLETE": 2}
    # The study's trainers (one a CPU on this two-CPU Ray) each held one GPU.
    assert result["auto"] == [1.0, 1.0]


def test_trainers_share_a_gpu_by_a_fractional_gpus_per_trainer(gpu_study):
    half = gpu_study["half"]
    # ray.gpus_per_trainer 0.5: each trainer asked for half a GPU, and the study ran.
    assert half["gpus"] == [0.5, 0.5]
    assert half["counts"] == {"COMPLETE": 2}
