"""GPUs through Ray: on this CPU machine, Ray's logical GPU resources stand in for real ones."""

import json
import os
import subprocess
import sys

# A Ray of its own with two logical GPUs (the tests' shared Ray has none), in a subprocess.
SCRIPT = """
import json, sys
import ray
from pipeline.study.driver import run_study
from pipeline.study.launch import Launch
from pipeline.study.trainer import _gpu_from_ray, gpus_per_trainer, start_trainer
from pipeline.training.device import trains_on_cpu
from tests.conftest import study_config

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
outcome = run_study(config.with_params({"train.device": "auto"}), progress=False)
print(json.dumps({"places": places, "derived": derived, "counts": outcome.counts,
                  "cpu_rule": [cpu_rule[0], cpu_rule[1]]}))
"""


def test_trainers_get_their_own_gpu_from_ray_and_torch_sees_only_it(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
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
