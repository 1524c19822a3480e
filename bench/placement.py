"""How a grid study splits between trainers, by the driver's placement alone: deterministic,
no Ray, no training, no timing.

What is simulated: the driver's loop (study/driver.py) on a grid config: it asks trials
costliest first while fewer than `lanes × trainers` are in flight, places them as
`_Driver._place` does (`placement.place_run` where this checkout has it, else `place` trial by
trial), and each trainer steps every set of lanes it holds one window per turn, in turn. A
turn takes the sum of its sets' windows by a fixed model of a window's time, the same whatever
the checkout: 290 µs + 0.17 µs × layers × (H + 4)² × the models counted as `cost.py` counts
them (the fit of 3 December 2026, bench/trainer.py). As the driver does with Ray on one
machine, trainers with nothing left lend their CPU to those still training, whose sets then
step side by side. Trials end after their windows; none is pruned.

It prints, per trainer, when it ended and what it did (modelled seconds), the lanes per step
(models per window of a set, as bench/study.py reports it), and how each architecture's
trials split between the trainers. Why: to see, without timing noise, whether placement keeps
each architecture's lanes whole and what that does to the trainers' ends.

    python bench/placement.py                       # configs/study.yaml at 2 epochs, 1 and 2
    python bench/placement.py --trainers 2 --epochs 5
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import this_checkout  # noqa: F401  (first on the path: this checkout's pipeline)
from report import table

from pipeline.config import Config, ModelConfig, load_config
from pipeline.study import placement
from pipeline.study.driver import DEFAULT_LANES
from pipeline.study.placement import TrialWork, Workload, grid_points
from pipeline.training.cost import models_to_vectorize_over
from pipeline.training.trial import lanes_key

SET_WINDOW_US = 290.0
MODEL_UNIT_US = 0.17


def window_us(model: ModelConfig, models: int) -> float:
    """The modelled time of a window of `models` lanes of `model`'s architecture."""
    switch = models_to_vectorize_over(model.state_size)
    effective = models if models <= switch else switch + (models - switch) / 2
    units = model.num_layers * (model.state_size + 4) ** 2 * effective
    return SET_WINDOW_US + MODEL_UNIT_US * units


@dataclass
class SimTrainer:
    work: Workload = field(default_factory=Workload)
    left: dict[tuple, list[float]] = field(default_factory=dict)
    """Per set of lanes, the windows each of its trials has left."""
    models: dict[tuple, ModelConfig] = field(default_factory=dict)
    ended: float = 0.0
    busy: float = 0.0
    set_windows: float = 0.0
    lane_windows: float = 0.0
    placed: Counter = field(default_factory=Counter)

    @property
    def trials(self) -> int:
        return sum(len(windows) for windows in self.left.values())

    def take(self, trial: TrialWork) -> None:
        self.work.add(trial)
        self.left.setdefault(trial.lanes_key, []).append(float(trial.windows))
        self.models[trial.lanes_key] = trial.model
        self.placed[trial.lanes_key] += 1

    def turn(self, threads: int) -> float:
        """A turn's time: every set one window, side by side on `threads` threads."""
        costs = [window_us(self.models[key], len(w)) for key, w in self.left.items()]
        return max(max(costs), sum(costs) / threads)


def simulate(config: Config, trainers: int) -> list[SimTrainer]:
    """Run the driver's loop on `trainers` simulated trainers; their state at the end."""
    keys = [p.key for p in config.study.search]
    points = iter(grid_points(config))
    lanes = config.study.lanes_per_trainer or DEFAULT_LANES["grid"]
    sims = [SimTrainer() for _ in range(trainers)]
    queue: list[TrialWork] = []
    now, asking = 0.0, True
    while True:
        while asking and len(queue) + sum(s.trials for s in sims) < lanes * trainers:
            point = next(points, None)
            if point is None:
                asking = False
                break
            trial = config.with_params(dict(zip(keys, point, strict=True)))
            queue.append(TrialWork(lanes_key(trial), trial.model, trial.total_steps))
        _place(sims, queue, lanes)
        busy = [s for s in sims if s.trials]
        if not busy:
            return sims
        lend = (trainers - len(busy)) // len(busy) if not asking and not queue else 0
        turns = {id(s): s.turn(1 + lend) for s in busy}
        step = min(min(min(w) for w in s.left.values()) * turns[id(s)] for s in busy)
        now += step
        for sim in busy:
            windows = step / turns[id(sim)]
            sim.busy += step
            sim.ended = now
            sim.set_windows += windows * len(sim.left)
            sim.lane_windows += windows * sim.trials
            sim.work.stepped({key: round(windows) for key in sim.left})
            for key in list(sim.left):
                left = [w - windows for w in sim.left[key]]
                for _ in [w for w in left if w <= 1e-6]:
                    sim.work.remove(key)
                sim.left[key] = [w for w in left if w > 1e-6]
                if not sim.left[key]:
                    del sim.left[key]


def _place(sims: list[SimTrainer], queue: list[TrialWork], lanes: int) -> None:
    """As `_Driver._place`, with this checkout's placement."""
    while queue:
        roomy = [s for s in sims if s.trials < lanes]
        if not roomy:
            return
        if hasattr(placement, "place_run"):
            rooms = [lanes - s.trials for s in roomy]
            chosen = placement.place_run([s.work for s in roomy], rooms, queue)
        else:  # before place_run: trial by trial
            chosen = [placement.place([s.work for s in roomy], queue[0])]
        for index in chosen:
            roomy[index].take(queue.pop(0))


def report(config: Config, trainers: int) -> list[str]:
    sims = simulate(config, trainers)
    end = max(s.ended for s in sims)
    lane_windows = sum(s.lane_windows for s in sims)
    set_windows = sum(s.set_windows for s in sims)
    rows = [
        (
            i + 1,
            f"{s.ended / 1e6:.1f}",
            f"{s.busy / 1e6:.1f}",
            f"{s.lane_windows / s.set_windows:.1f}",
        )
        for i, s in enumerate(sims)
    ]
    lines = [
        f"**{trainers} trainer(s)**: the last ends at {end / 1e6:.1f} s (modelled), "
        f"lanes per step {lane_windows / set_windows:.1f}",
        "",
        *table(["trainer", "ends at s", "busy s", "lanes per step"], rows),
        "",
    ]
    if trainers > 1:
        split: dict[tuple, list[int]] = defaultdict(lambda: [0] * trainers)
        models = {}
        for i, sim in enumerate(sims):
            for key, count in sim.placed.items():
                split[key][i] = count
                models[key] = sim.models[key]
        ordered = sorted(split, key=lambda k: (-models[k].state_size, -models[k].num_layers))
        rows = [
            (f"{models[k].num_layers} × {models[k].state_size}", " / ".join(map(str, split[k])))
            for k in ordered
        ]
        lines += [*table(["layers × state", "trials per trainer"], rows), ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/study.yaml")
    parser.add_argument("--epochs", type=int, default=2, help="train.epochs (default 2)")
    parser.add_argument("--trainers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    config = load_config(args.config).with_params({"train.epochs": args.epochs})
    lines = [
        f"{args.config} at {args.epochs} epochs, placement: "
        f"{'place_run' if hasattr(placement, 'place_run') else 'place, trial by trial'}",
        "",
    ]
    for trainers in args.trainers:
        lines += report(config, trainers)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
