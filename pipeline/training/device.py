"""Which device a set of lanes trains on, and with which window step: the one place that
decides, for the `train` command, the benchmarks and the study's trainers alike.

On the CPU the step is the numba kernels' (cpu_step.py) on numpy arrays, and torch is never
imported: its import took each trainer 0.8 s of a core at its start. Without numba, or with
`train.compile: false`, it is eager torch. On CUDA it is torch.compile's step (torch_step.py),
falling back to eager torch when the compiler fails.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from pipeline.config import Config, ConfigError, TrainConfig
from pipeline.training.arrays import WindowStep
from pipeline.training.cpu_step import cpu_step, numba_kernels

if TYPE_CHECKING:
    import torch


def window_step(
    config: Config, threads: int | None = None, gpu_from_ray: bool | None = None
) -> tuple[WindowStep, Any]:
    """The step of a set of lanes of `config`, and the device of their arrays ("cpu" for the
    numba step's numpy arrays, else a torch.device).

    `gpu_from_ray`: in a Ray trainer, whether Ray gave it a GPU; `auto` then means that GPU,
    never one taken behind Ray's back. None outside Ray, where `auto` means a GPU when torch
    sees one. `threads`: torch's thread count, where torch trains on the CPU (Ray sets
    OMP_NUM_THREADS per worker, but torch read it when the process started)."""
    if trains_on_cpu(config.train.device, gpu_from_ray):
        step = cpu_step(config.train.compile)
        if step is not None:
            return step, "cpu"
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    device = resolve_device(
        "cpu" if trains_on_cpu(config.train.device, gpu_from_ray) else config.train.device
    )
    return step_function(config.train.compile, device), device


def step_function(mode: bool | str, device: torch.device) -> WindowStep:
    """The training step for `train.compile` = mode (True, False or "auto") on this device.

    On the CPU, True and "auto" give the numba kernels (kernels.py: compiled once per machine
    for every shape, then loaded from disk in a fraction of a second), a step on numpy arrays
    (its `arrays` says so); on CUDA they give torch.compile's kernels. False, or a compiler
    that fails, gives eager torch; a failure warns once per process.
    """
    from pipeline.training import torch_step

    if mode is False:
        return torch_step.eager_step()
    if device.type == "cpu":
        return cpu_step(mode) or torch_step.eager_step()
    return torch_step.inductor_step()


def trains_on_cpu(device: str, gpu_from_ray: bool | None = None) -> bool:
    """Whether lanes train on the CPU: asked to, or `auto` where Ray gave no GPU. Outside Ray
    (`gpu_from_ray` None), `auto` is decided by torch (`resolve_device`)."""
    return device == "cpu" or (device == "auto" and gpu_from_ray is False)


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device = {name!r}: torch sees {torch.cuda.device_count()} CUDA devices; "
            "use auto or cpu"
        )
    return device


def load_cpu_kernels(train: TrainConfig, gpu_from_ray: bool, compile_missing: bool) -> None:
    """Load (or compile) the numba kernels of a trainer that trains on the CPU before its first
    trial arrives: once per process (`numba_kernels` is cached), so that its lanes' steps find
    them loaded. On a cold machine, a family at least: the windows take up the others as they
    are compiled (`cpu_step._ready_family`). Without `compile_missing` (Ray embedded: the
    driver compiles ahead the families its study wants), a family is compiled here only when
    none is anywhere."""
    if train.compile is False or not trains_on_cpu(train.device, gpu_from_ray):
        return
    if not compile_missing:
        # No numba, or one that cannot run here (a kernel cache it cannot write raises
        # RuntimeError): numba_kernels warns and the lanes train with eager torch.
        with contextlib.suppress(Exception):
            from pipeline.training import kernel_compile

            kernel_compile.load_only_cached()
    numba_kernels()
