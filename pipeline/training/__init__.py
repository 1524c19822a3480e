"""Training: the echo data, the LSTM's arrays, the window steps (torch, and numba on the CPU),
the numba kernels and their cache, lanes, and `train`.

Everything a trainer runs, and nothing about studies: no module here imports Ray, Optuna,
pandas or pyarrow, and one that trains on the CPU never imports torch.

- data.py: the echo series and a trial's seeds and windows.
- arrays.py: the weights and state of K models stacked on a last axis; the WindowStep contract.
- torch_step.py: the window's update in torch (eager, or torch.compile on GPUs).
- torch_backward.py: its backward written by hand, Adagrad, and the scratch it keeps.
- kernels.py: the same update as numba kernels, in two families; kernel_tiles.py writes their
  fused multiply-adds and register tiles as LLVM IR; kernel_compile.py compiles and loads
  them, sharing the work between processes; kernel_cache.py says where they are cached
  without importing numba.
- cpu_step.py: the numba kernels as a window step on numpy arrays, each window shape on the
  family of kernels measured faster there.
- device.py: which device and which step a set of lanes trains with (the one place).
- cost.py: what a window of an architecture costs, for placement and as the kernel choice's prior.
- trial.py: what lanes take and give (LaneTrial, Finished, Report) and `lanes_key`.
- lanes.py: many trials of one architecture trained side by side, each at its own window.
- train.py: `train`, the lockstep case, for the `train` command and the benchmarks.
"""
