"""Where a study's CPU goes, process by process: the driver, Ray's own processes, the trainers.

Runs `python -m pipeline study CONFIG` (Ray embedded, one CPU per trainer, on the CPU) once per
`--workers` count (default 1, then 2), each a fresh process in a session of its own, and
samples every 50 ms the CPU seconds (utime + stime, /proc/PID/stat) of every process in that
session or below it, sorted by what it is (from its command line: the driver, the GCS, the
raylet, the dashboard agent, the runtime-env agent, the log monitor, the Ray workers that ran a
trainer, the idle ones, the kernels' compile ahead, ...). A process's last sample is its CPU;
processes that lived less than a sample are missed (none of Ray's). Each is split at the span
in which the trainers trained (from their first CPU past their start to their last): before
(imports, Ray's start, the trainers' start), during (what competes with the trainers) and
after (the summary, Ray's stop). CPU seconds are far less
noisy than wall time on a shared machine; the 1-minute load and the machine's CPU seconds
that were not ours during each run say how shared it was.

Why: 2 Ray workers should run a study ≥ 1.8× faster than one (issue 24). On 2 cores every CPU
second that is not a trainer's is taken from one.

    python bench/cpu_split.py                        # configs/study.yaml at 2 epochs, 1 then 2
    python bench/cpu_split.py --rounds 2             # 1, 2, 1, 2: each row the mean
    python bench/cpu_split.py --threads              # and the driver's CPU by thread
    python bench/cpu_split.py configs/quick.yaml --epochs 1 --set ray.dashboard=true
    python bench/cpu_split.py --env RAY_enable_metrics_collection=0   # a Ray setting's effect
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from harness import child_env
from report import say, table, times
from this_checkout import ROOT

SAMPLE_S = 0.05
DRIVER = "driver (python -m pipeline study)"
TRAINERS = "Ray workers: trainers"
# A trainer's start (imports, loading the kernels) takes about a second of CPU; past that it
# trains.
TRAINER_START_CPU_S = 1.5
TICKS = os.sysconf("SC_CLK_TCK")
# What a process is, from its command line (first match; Ray renames its workers `ray::NAME`).
KINDS = (
    ("gcs_server", "GCS server"),
    ("raylet/raylet", "raylet"),
    ("dashboard/agent.py", "dashboard agent (metrics, events)"),
    ("runtime_env/agent/main.py", "runtime-env agent"),
    ("log_monitor.py", "log monitor"),
    ("autoscaler/_private/monitor.py", "autoscaler monitor"),
    ("dashboard/dashboard.py", "API server (dashboard)"),
    ("kernel_compile", "compile ahead (kernels)"),
    ("ray::Trainer", TRAINERS),
    ("ray::", "Ray workers: idle or other"),
    ("default_worker.py", "Ray workers: idle or other"),
    # A fork of the driver: the summary draws its loss curves in one (summary/forked.py).
    ("-m pipeline study", "driver's fork (summary: loss curves)"),
)


@dataclass
class Run:
    """One measured study: its wall time and the CPU seconds of each process, by kind."""

    workers: int
    wall: float
    cpu: dict[str, float]
    phases: dict[str, tuple[float, float, float]]
    """CPU seconds by kind before the trainers train, while they do, and after."""
    processes: Counter[str]
    threads: dict[str, float]
    others: float
    """CPU seconds of the machine that were not this study's (other users' work, this
    script's sampling)."""
    load: float
    training: tuple[float, float]
    """Seconds from launch at which the trainers started and stopped training."""


@dataclass
class _Seen:
    """A process of the study as sampled: its CPU seconds at each sample's time, the titles
    it had (a forked process execs, and Ray retitles its workers)."""

    samples: list[tuple[float, float]] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)

    def seconds(self, until: float = math.inf) -> float:
        """Its CPU seconds at its last sample up to `until`."""
        return max((cpu for t, cpu in self.samples if t <= until), default=0.0)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    runs: dict[int, list[Run]] = defaultdict(list)
    for round_ in range(args.rounds):
        for workers in args.workers:
            say(f"round {round_ + 1}: {args.config} on {workers} Ray worker(s)")
            runs[workers].append(_measure(args, workers))
    print(_report(args, runs))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/study.yaml", help="a study config")
    parser.add_argument("--epochs", type=int, default=2, help="train.epochs (default 2)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="Ray CPUs per run (default 1 2)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of each count (default 1)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable of the study's process, e.g. one of Ray's RAY_<setting>",
    )
    parser.add_argument("--threads", action="store_true", help="the driver's CPU by thread")
    return parser


def _measure(args: argparse.Namespace, workers: int) -> Run:
    """Run the study on `workers` CPUs of an embedded Ray, sampling its processes' CPU."""
    folder = Path(tempfile.mkdtemp(prefix="echo-cpu-split-"))
    overrides = [
        f"train.epochs={args.epochs}",
        "train.device=cpu",
        "ray.cpus_per_trainer=1",
        "ray.address=null",
        f"ray.num_cpus={workers}",
        *args.set,
    ]
    argv = [sys.executable, "-m", "pipeline", "study", args.config, "--output", str(folder / "out")]
    argv += [arg for override in overrides for arg in ("--set", override)]
    load = os.getloadavg()[0]
    machine_before, reaped_before = _machine_busy(), _reaped_cpu()
    seen: dict[int, _Seen] = {}
    threads: dict[str, float] = {}
    started = time.perf_counter()
    with open(folder / "stderr.log", "wb") as err:
        child = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=child_env(dict(item.split("=", 1) for item in args.env)),
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        while child.poll() is None:
            _sample(
                child.pid, time.perf_counter() - started, seen, threads if args.threads else None
            )
            time.sleep(SAMPLE_S)
    except BaseException:
        os.killpg(child.pid, signal.SIGTERM)
        raise
    wall = time.perf_counter() - started
    # Popen reaped the child: its rusage (and its reaped descendants') is in RUSAGE_CHILDREN.
    machine_cpu = _machine_busy() - machine_before
    if child.returncode != 0:
        tail = (folder / "stderr.log").read_text(errors="replace").splitlines()[-15:]
        sys.exit(f"error: the study exited {child.returncode}:\n" + "\n".join(tail))
    shutil.rmtree(folder, ignore_errors=True)
    kinds = {pid: DRIVER if pid == child.pid else _kind(p.titles) for pid, p in seen.items()}
    begin, end = _training_span([p for pid, p in seen.items() if kinds[pid] == TRAINERS])
    cpu: dict[str, float] = defaultdict(float)
    phases: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    processes: Counter[str] = Counter()
    for pid, process in seen.items():
        kind = kinds[pid]
        at_begin, at_end, total = process.seconds(begin), process.seconds(end), process.seconds()
        cpu[kind] += total
        for i, seconds in enumerate((at_begin, at_end - at_begin, total - at_end)):
            phases[kind][i] += seconds
        processes[kind] += 1
    # What the reaped tree used, where the kernel accounted it (processes that Ray leaves to
    # init are not): a floor under the study's CPU, for the machine's share of others.
    ours = max(_reaped_cpu() - reaped_before, sum(cpu.values()))
    others = max(0.0, machine_cpu - ours)
    return Run(
        workers,
        wall,
        dict(cpu),
        {kind: tuple(values) for kind, values in phases.items()},
        processes,
        threads,
        others,
        load,
        (begin, end),
    )


def _training_span(trainers: list[_Seen]) -> tuple[float, float]:
    """From the first sample at which a trainer had used more CPU than its start (imports and
    kernels: the first second of its CPU) to the last at which any trainer's CPU grew."""
    begin, end = math.inf, 0.0
    for process in trainers:
        first = process.samples[0][1] if process.samples else 0.0
        previous = None
        for t, cpu in process.samples:
            if cpu > first + TRAINER_START_CPU_S:
                begin = min(begin, t)
            if previous is not None and cpu > previous:
                end = max(end, t)
            previous = cpu
    return (0.0, 0.0) if begin == math.inf else (begin, max(begin, end))


def _reaped_cpu() -> float:
    """CPU seconds of every child this process has reaped, and of their reaped descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _sample(
    root: int, now: float, seen: dict[int, _Seen], threads: dict[str, float] | None
) -> None:
    """Record the CPU seconds so far of every live process in `root`'s session or below it."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat(f"/proc/{name}/stat")
            if stat is not None:
                stats[int(name)] = stat
    children = defaultdict(list)
    for pid, (ppid, _, _) in stats.items():
        children[ppid].append(pid)
    ours, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in ours:
            ours.add(pid)
            todo += children.get(pid, [])
    ours |= {pid for pid, (_, session, _) in stats.items() if session == root}
    for pid in ours & stats.keys():
        process = seen.setdefault(pid, _Seen())
        process.samples.append((now, stats[pid][2]))
        title = _cmdline(pid)
        if title and title not in process.titles:
            process.titles.append(title)
    if threads is not None and root in stats:
        _sample_threads(root, threads)


def _sample_threads(pid: int, threads: dict[str, float]) -> None:
    per_name: dict[str, float] = defaultdict(float)
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = _stat(f"/proc/{pid}/task/{tid}/stat", with_name=True)
        if stat is not None:
            per_name[stat[3]] += stat[2]
    for name, seconds in per_name.items():
        threads[name] = max(threads.get(name, 0.0), seconds)


def _stat(path: str, with_name: bool = False) -> tuple | None:
    """(ppid, session, CPU seconds[, comm]) from a /proc stat file; None when it is gone."""
    try:
        with open(path) as file:
            text = file.read()
    except OSError:
        return None
    name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :]
    fields = rest.split()
    # fields[0] is field 3 (state): ppid 4, session 6, utime 14, stime 15.
    seconds = (int(fields[11]) + int(fields[12])) / TICKS
    result = (int(fields[1]), int(fields[3]), seconds)
    return (*result, name) if with_name else result


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _kind(titles: list[str]) -> str:
    """What a process was, from any of its titles (KINDS in order: a worker that ran a
    trainer at any sample is a trainer's)."""
    for mark, kind in KINDS:
        if any(mark in title for title in titles):
            return kind
    return f"other: {titles[-1][:40] if titles else '?'}"


def _machine_busy() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and
    iowait)."""
    with open("/proc/stat") as file:
        values = [int(v) for v in file.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / TICKS


def _report(args: argparse.Namespace, runs: dict[int, list[Run]]) -> str:
    counts = list(runs)
    kinds = sorted(
        {kind for runs_ in runs.values() for run in runs_ for kind in run.cpu},
        key=lambda kind: -max(_mean(runs[n], kind) for n in counts),
    )
    header = [
        "process",
        *[f"{n} worker(s): CPU s (processes): before / during / after" for n in counts],
    ]
    rows = [[kind, *[_cell(runs[n], kind) for n in counts]] for kind in kinds]
    rows.append(["**all**", *[f"{_total(runs[n]):.2f}" for n in counts]])
    rows.append(["wall s (training from / to)", *[_walls(runs[n]) for n in counts]])
    rows.append(["CPU s not a trainer's", *[f"{_overhead(runs[n]):.2f}" for n in counts]])
    rows.append(
        ["others' CPU s on the machine", *[f"{_avg(runs[n], 'others'):.1f}" for n in counts]]
    )
    rows.append(["1-minute load at the start", *[f"{_avg(runs[n], 'load'):.1f}" for n in counts]])
    lines = [
        f"### CPU by process: {args.config} at {args.epochs} epochs "
        f"({', '.join([*args.set, *args.env]) or 'no overrides'}), {os.cpu_count()} CPUs",
        "",
        f"- mean of {args.rounds} run(s) of each; CPU s: utime + stime sampled every "
        f"{SAMPLE_S * 1000:.0f} ms; wall s: launch to exit of `python -m pipeline study`",
        "",
        *table(header, rows),
    ]
    if len(counts) >= 2:
        first, last = counts[0], counts[-1]
        ratio = _avg(runs[first], "wall") / _avg(runs[last], "wall")
        lines += ["", f"Wall time, {first} against {last} worker(s): {times(ratio)}"]
    if args.threads:
        lines += ["", "Driver CPU s by thread (last run of each):", ""]
        names = sorted({name for n in counts for name in runs[n][-1].threads})
        lines += table(
            ["thread", *[f"{n} worker(s)" for n in counts]],
            [[name, *[f"{runs[n][-1].threads.get(name, 0.0):.2f}" for n in counts]]
             for name in names],
        )  # fmt: skip
    return "\n".join(lines)


def _cell(runs: list[Run], kind: str) -> str:
    """A kind's mean CPU seconds, its processes, and its split by phase."""
    phases = [sum(run.phases.get(kind, (0.0, 0.0, 0.0))[i] for run in runs) / len(runs)
              for i in range(3)]  # fmt: skip
    split = " / ".join(f"{seconds:.1f}" for seconds in phases)
    return f"{_mean(runs, kind):.2f} ({_processes(runs, kind)}): {split}"


def _mean(runs: list[Run], kind: str) -> float:
    return sum(run.cpu.get(kind, 0.0) for run in runs) / len(runs)


def _processes(runs: list[Run], kind: str) -> int:
    return max(run.processes.get(kind, 0) for run in runs)


def _total(runs: list[Run]) -> float:
    return sum(sum(run.cpu.values()) for run in runs) / len(runs)


def _overhead(runs: list[Run]) -> float:
    return _total(runs) - _mean(runs, TRAINERS)


def _avg(runs: list[Run], name: str) -> float:
    return sum(getattr(run, name) for run in runs) / len(runs)


def _walls(runs: list[Run]) -> str:
    return " / ".join(
        f"{run.wall:.1f} ({run.training[0]:.1f} to {run.training[1]:.1f})" for run in runs
    )


if __name__ == "__main__":
    main()
