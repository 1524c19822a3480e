"""The config's sections: frozen dataclasses, each field checked when it is built, with the
field's scope (what it means to a trainer) kept on the field itself, and the dotted keys
derived from them."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.config.checks import (
    ConfigError,
    coerce,
    fail,
    kind_of,
    require_bool,
    require_choice,
    require_float,
    require_int,
)
from pipeline.config.search import SearchParam, check_combinations

# What a key means to a trainer, kept on the field itself so that every list of keys below
# derives from one source (a new field cannot be forgotten in one of them):
#   LANE    may differ between the trials that train side by side in one trainer;
#   SHARED  fixes the tensors' shapes or the data's layout: one trainer's lanes share it;
#   RUN     says how much runs and where, not what is computed: it may change between runs
#           into one output, and it is never searched.
LANE, SHARED, RUN = "lane", "shared", "run"

# The largest values the results' Parquet columns hold (results/tables.py): epoch, epochs,
# num_layers and state_size are int16, series_length and a trial's steps int32. The config
# refuses more rather than let a column wrap around (test_config ties each to its column).
INT16_MAX = 2**15 - 1
INT32_MAX = 2**31 - 1
# A trial's steps are epochs × windows per epoch: with at most INT16_MAX epochs, at most this
# many windows per epoch keeps every step in an int32, each rule within its own section.
MAX_WINDOWS_PER_EPOCH = INT32_MAX // INT16_MAX


def _field(default: Any, scope: str) -> Any:
    return field(default=default, metadata={"scope": scope})


@dataclass(frozen=True)
class TaskConfig:
    """The echo task of the tutorial: predict the input delayed by `echo_step`."""

    SECTION: ClassVar[str] = "task"

    series_length: int = _field(50_000, SHARED)
    """Length of the random binary series drawn anew every epoch."""
    echo_step: int = _field(3, LANE)
    """The target is the input delayed by this many steps."""
    batch_size: int = _field(5, SHARED)
    """The series is cut into this many contiguous rows, trained side by side."""
    truncation: int = _field(15, SHARED)
    """Columns per truncated-BPTT window; no gradient crosses a window boundary."""

    def __post_init__(self) -> None:
        require_int(self, "series_length", minimum=1, maximum=INT32_MAX)
        require_int(self, "batch_size", minimum=1)
        require_int(self, "truncation", minimum=1)
        require_int(self, "echo_step", minimum=0)
        if self.echo_step >= self.series_length:
            fail(
                "task.echo_step",
                self.echo_step,
                f"must be < task.series_length ({self.series_length})",
            )
        if self.series_length % self.batch_size:
            fail(
                "task.series_length",
                self.series_length,
                f"must be a multiple of task.batch_size ({self.batch_size})",
            )
        if self.windows_per_epoch < 1:
            fail(
                "task.series_length",
                self.series_length,
                f"too short for one window: needs at least batch_size × truncation "
                f"= {self.batch_size * self.truncation}",
            )
        if self.windows_per_epoch > MAX_WINDOWS_PER_EPOCH:
            fail(
                "task.series_length",
                self.series_length,
                f"gives {self.windows_per_epoch} windows per epoch; at most "
                f"{MAX_WINDOWS_PER_EPOCH}, so that a trial's steps fit the steps table",
            )

    @property
    def columns(self) -> int:
        """Length of each batch row (one contiguous sub-series)."""
        return self.series_length // self.batch_size

    @property
    def windows_per_epoch(self) -> int:
        """Full windows per epoch; the tutorial drops the columns left over after the last one."""
        return self.columns // self.truncation


@dataclass(frozen=True)
class ModelConfig:
    """The stacked LSTM: `num_layers` layers of `state_size` units, then 2 output classes."""

    SECTION: ClassVar[str] = "model"

    num_layers: int = _field(3, SHARED)
    """Stacked LSTM layers; each carries its own (h, c) state from window to window."""
    state_size: int = _field(4, SHARED)
    """Units per LSTM layer."""

    def __post_init__(self) -> None:
        require_int(self, "num_layers", minimum=1, maximum=INT16_MAX)
        require_int(self, "state_size", minimum=1, maximum=INT16_MAX)


@dataclass(frozen=True)
class TrainConfig:
    """How one model is trained: Adagrad as in the tutorial, state carried across windows."""

    SECTION: ClassVar[str] = "train"
    DEVICES: ClassVar[tuple[str, ...]] = ("auto", "cpu", "cuda")

    epochs: int = _field(5, LANE)
    """Epochs; each draws a new series and resets the carried state to zeros."""
    lr: float = _field(0.3, LANE)
    """Adagrad learning rate."""
    seed: int = _field(0, LANE)
    """Seed of a single `train` run; in a study a replicate key mixed into each trial's seed."""
    carry_state: bool = _field(True, SHARED)
    """Carry the LSTM state from one window to the next (false: start every window at zeros)."""
    device: str = _field("auto", RUN)
    """auto (a GPU when there is one), cpu, cuda or cuda:N."""
    compile: bool | str = _field("auto", RUN)
    """Compiled training step: true or auto (the default) compile it, numba kernels on the CPU
    (compiled once per machine, cached under NUMBA_CACHE_DIR or ~/.cache/echo-study/numba),
    torch.compile on a GPU; false trains with eager torch. A compiler that fails warns once and
    the run goes on eagerly."""
    log_every: int = _field(100, RUN)
    """The `train` command prints a loss line every this many windows, as the tutorial does."""

    def __post_init__(self) -> None:
        require_int(self, "epochs", minimum=1, maximum=INT16_MAX)
        require_float(self, "lr")
        if not self.lr > 0:
            fail("train.lr", self.lr, "must be a finite number > 0")
        require_int(self, "seed", minimum=0, maximum=2**63 - 1)
        require_bool(self, "carry_state")
        if not isinstance(self.device, str) or not (
            self.device in self.DEVICES
            or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            fail("train.device", self.device, "must be one of auto, cpu, cuda, cuda:N")
        if not (self.compile is True or self.compile is False or self.compile == "auto"):
            fail("train.compile", self.compile, "must be true, false or auto")
        require_int(self, "log_every", minimum=1)


SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("none", "median", "hyperband")
OBJECTIVES = ("final_loss", "mean_loss")
SEARCHABLE_SECTIONS = (TaskConfig, ModelConfig, TrainConfig)


@dataclass(frozen=True)
class StudyConfig:
    """The Optuna study: what varies, how it is sampled and pruned, where it is stored."""

    SECTION: ClassVar[str] = "study"

    name: str = "echo-study"
    """Study name inside the storage."""
    trials: int | None = _field(None, RUN)
    """Trials to finish; for the grid sampler optional (default: the grid's size)."""
    sampler: str = "grid"
    """grid, tpe or random; seeded from study.seed."""
    pruner: str = "none"
    """none, median or hyperband: Optuna's pruner, fed the running loss every report_every steps."""
    search: tuple[SearchParam, ...] = ()
    """What varies: dotted key → list of choices (a grid axis) or {low, high, log, step}."""
    objective: str = "final_loss"
    """Minimized: final_loss (mean loss over the last epoch) or mean_loss (over every step)."""
    seed: int = 0
    """Seeds the sampler and, with each trial's parameters, the trial's weights and data."""
    storage: str | None = None
    """Optuna storage URL; default: the journal file study.journal in the output folder."""
    lanes_per_trainer: int | None = _field(None, RUN)
    """Trials one trainer trains side by side (its lanes); default 64, or 8 for tpe, where
    fewer trials in flight means each is sampled knowing more finished ones."""
    report_every: int = 100
    """Steps between the intermediate values a trial reports to the pruner."""
    only_writer: bool = _field(False, RUN)
    """Run into a remote output (s3://, gs://), which cannot be locked, promising that no other
    study writes there meanwhile."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            fail("study.name", self.name, "must be a non-empty string")
        if self.trials is not None:
            require_int(self, "trials", minimum=1)
        require_choice(self, "sampler", SAMPLERS)
        require_choice(self, "pruner", PRUNERS)
        require_choice(self, "objective", OBJECTIVES)
        require_int(self, "seed", minimum=0, maximum=2**32 - 1)
        if self.storage is not None and (not isinstance(self.storage, str) or not self.storage):
            fail("study.storage", self.storage, "must be an Optuna storage URL or null")
        if self.lanes_per_trainer is not None:
            require_int(self, "lanes_per_trainer", minimum=1, maximum=4096)
        require_int(self, "report_every", minimum=1)
        require_bool(self, "only_writer")
        if self.sampler == "grid":
            ranges = [p.key for p in self.search if p.choices is None]
            if ranges:
                fail(
                    f"study.search.{ranges[0]}",
                    self.search_param(ranges[0]).to_yaml(),
                    "the grid sampler needs a list of choices, not a range",
                )
            if self.trials is not None and self.trials > self.grid_size:
                fail(
                    "study.trials",
                    self.trials,
                    f"must be <= the grid's size ({self.grid_size})",
                )
        elif self.trials is None:
            raise ConfigError(f"study.trials: required for the {self.sampler} sampler")

    @property
    def grid_size(self) -> int:
        """Points in the grid of all choices (1 for an empty search)."""
        return math.prod(len(p.choices or ()) for p in self.search)

    @property
    def n_trials(self) -> int:
        """Trials the study runs to: study.trials, or the whole grid."""
        return self.trials if self.trials is not None else self.grid_size

    def search_param(self, key: str) -> SearchParam:
        return next(p for p in self.search if p.key == key)


@dataclass(frozen=True)
class ConvergenceConfig:
    """When a trial counts as converged: its moving-average loss fell below a threshold."""

    SECTION: ClassVar[str] = "convergence"

    threshold: float = 0.01
    """Converged once the moving average of the loss is below this."""
    window: int = 100
    """Steps in that moving average."""

    def __post_init__(self) -> None:
        require_float(self, "threshold")
        if not self.threshold > 0:
            fail("convergence.threshold", self.threshold, "must be a finite number > 0")
        require_int(self, "window", minimum=1)


@dataclass(frozen=True)
class RayConfig:
    """Where trials run: an embedded Ray on this machine, or an existing cluster."""

    SECTION: ClassVar[str] = "ray"

    address: str | None = _field(None, RUN)
    """null: start Ray embedded here; `auto`, `ray://host:port` or host:port: join that cluster."""
    cpus_per_trainer: int = _field(1, RUN)
    """CPUs each trainer asks of Ray (a trainer trains many trials side by side), and torch's
    thread count inside it."""
    gpus_per_trainer: float | None = _field(None, RUN)
    """GPUs (a fraction is fine) each trainer asks of Ray; default: 1 when train.device asks for
    CUDA, or is auto on a cluster with GPUs, else 0."""
    num_cpus: int | None = _field(None, RUN)
    """CPUs of the embedded Ray (default: all of this machine's); ignored on a cluster."""
    placement_timeout_s: float = _field(300.0, RUN)
    """Seconds a trainer waits for Ray to place it, saying what it waits for, before the study
    stops (or, while other trainers run, gives that one up); on a cluster, also how long a study
    waits for a node that can hold a trainer to join."""
    max_retries: int = _field(2, RUN)
    """Times a trial whose trainer died (worker or node lost) runs again before it is FAIL."""
    dashboard: bool = _field(False, RUN)
    """Start the Ray dashboard (on 127.0.0.1) with the embedded Ray."""

    def __post_init__(self) -> None:
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            fail(
                "ray.address",
                self.address,
                "must be auto, ray://host:port, host:port or null",
            )
        require_int(self, "cpus_per_trainer", minimum=1)
        if self.gpus_per_trainer is not None:
            require_float(self, "gpus_per_trainer")
            if not 0 <= self.gpus_per_trainer <= 64:
                fail("ray.gpus_per_trainer", self.gpus_per_trainer, "must be between 0 and 64")
        if self.num_cpus is not None:
            require_int(self, "num_cpus", minimum=1)
        require_float(self, "placement_timeout_s")
        if not self.placement_timeout_s > 0:
            fail("ray.placement_timeout_s", self.placement_timeout_s, "must be a number > 0")
        require_int(self, "max_retries", minimum=0)
        require_bool(self, "dashboard")


SECTIONS = (
    TaskConfig,
    ModelConfig,
    TrainConfig,
    StudyConfig,
    ConvergenceConfig,
    RayConfig,
)


@dataclass(frozen=True)
class Config:
    """The whole config file; each section is its own frozen dataclass."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    output: str = "results/echo-study"
    """Folder (or pyarrow.fs URI such as s3://bucket/path) that receives the results."""

    def __post_init__(self) -> None:
        if not isinstance(self.output, str) or not self.output.strip():
            fail("output", self.output, "must be a folder path or a URI")

    def check_search(self) -> Config:
        """This config, once every searched value is valid in it (each section is valid with
        that value in it); raises ConfigError otherwise. Done when a config is loaded or its
        study changes, not for each trial's config, which would check the whole grid again."""
        for param in self.study.search:
            self._check_search_param(param)
        for section in SEARCHABLE_SECTIONS:
            params = tuple(p for p in self.study.search if _split_key(p.key)[0] == section.SECTION)
            if params:
                check_combinations(getattr(self, section.SECTION), params)
        return self

    @property
    def total_steps(self) -> int:
        """Windows a trial trains on: epochs × windows per epoch."""
        return self.train.epochs * self.task.windows_per_epoch

    def with_params(self, params: Mapping[str, Any]) -> Config:
        """This config with some dotted keys replaced, e.g. a trial's sampled parameters."""
        changes: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            section, name = _split_key(key)
            changes.setdefault(section, {})[name] = value
        output = changes.pop("output", {}).get("output", self.output)
        sections = {
            section: dataclasses.replace(getattr(self, section), **_coerced(section, values))
            for section, values in changes.items()
        }
        config = dataclasses.replace(self, **sections, output=output)
        return config.check_search() if "study" in changes else config

    def value(self, key: str) -> Any:
        """The value of a dotted key, e.g. `config.value("model.num_layers")`."""
        section, name = _split_key(key)
        return self.output if key == "output" else getattr(getattr(self, section), name)

    def differences(self, other: Config) -> list[str]:
        """Dotted keys on which two configs disagree about what is computed; keys that say only
        how much runs and where (RUN_KEYS) are ignored, so a study can be resumed with more
        trials or on another cluster."""
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        keys = sorted(set(mine) | set(theirs), key=all_keys().index)
        return [k for k in keys if k not in RUN_KEYS and mine.get(k) != theirs.get(k)]

    def to_dict(self) -> dict[str, Any]:
        """The plain-YAML form of this config (what config.yaml holds)."""
        raw: dict[str, Any] = {}
        for section in SECTIONS:
            values = getattr(self, section.SECTION)
            raw[section.SECTION] = {f.name: getattr(values, f.name) for f in fields_of(section)}
        raw["study"]["search"] = {p.key: p.to_yaml() for p in self.study.search}
        raw["output"] = self.output
        return raw

    def _check_search_param(self, param: SearchParam) -> None:
        where = f"study.search.{param.key}"
        values = param.choices if param.choices is not None else (param.low, param.high)
        for value in values:
            self._check_value(where, param.key, value)
        if param.choices is not None:
            return
        if not param.low < param.high:
            fail(where, param.to_yaml(), "needs low < high")
        if param.log and param.low <= 0:
            fail(where, param.to_yaml(), "a log range needs low > 0")
        if param.log and param.step is not None:
            fail(where, param.to_yaml(), "takes log or step, not both")
        if param.step is not None and not param.step > 0:
            fail(where, param.to_yaml(), "needs step > 0")

    def _check_value(self, where: str, key: str, value: Any) -> None:
        """A searched value is valid when its section is valid with that value in it."""
        section, name = _split_key(key)
        try:
            dataclasses.replace(getattr(self, section), **{name: value})
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None


def keys_of_scope(scope: str, sections: Iterable[type] | None = None) -> list[str]:
    """Dotted keys whose field has this scope (LANE, SHARED or RUN), in declaration order."""
    return [
        f"{s.SECTION}.{f.name}"
        for s in (SECTIONS if sections is None else sections)
        for f in dataclasses.fields(s)
        if f.metadata.get("scope") == scope
    ]


# Keys that may change between runs into one output: how much runs and where, not what.
RUN_KEYS = frozenset([*keys_of_scope(RUN), "output"])


def _flatten(raw: Mapping[str, Any]) -> dict[str, Any]:
    flat = {}
    for section, values in raw.items():
        if isinstance(values, Mapping):
            flat.update({f"{section}.{name}": value for name, value in values.items()})
        else:
            flat[section] = values
    return flat


def ray_address(config: Config) -> str | None:
    """The Ray cluster a study joins: ray.address, else RAY_ADDRESS in the environment; None
    means Ray starts embedded in this process."""
    return config.ray.address or os.environ.get("RAY_ADDRESS") or None


def searchable_keys() -> list[str]:
    """Dotted keys a study may vary: what a trial computes, never how or where it runs."""
    keys = [f"{s.SECTION}.{f.name}" for s in SEARCHABLE_SECTIONS for f in fields_of(s)]
    return [k for k in keys if k not in RUN_KEYS]


def all_keys() -> list[str]:
    """Every dotted key of the vocabulary."""
    return [f"{s.SECTION}.{f.name}" for s in SECTIONS for f in fields_of(s)] + ["output"]


def _parse_search(raw: Any) -> tuple[SearchParam, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"study.search: must be a mapping of dotted keys, got {kind_of(raw)}")
    params = []
    for key, spec in raw.items():
        key = str(key)
        if key not in searchable_keys():
            raise ConfigError(unknown_key(key, searchable_keys(), what="searchable key"))
        where = f"study.search.{key}"
        if isinstance(spec, list | tuple):
            if not spec:
                fail(where, spec, "needs at least one choice")
            kind = _field_type(key)
            choices = tuple(coerce(where, choice, kind) for choice in spec)
            repeated = [c for i, c in enumerate(choices) if c in choices[:i]]
            if repeated:  # compared as the key's type: 4 and 4.0, 1e-3 and 0.001 are one
                fail(where, spec, f"lists {repeated[0]!r} twice")
            params.append(SearchParam(key, choices=choices))
        elif isinstance(spec, Mapping):
            params.append(_parse_range(where, key, spec))
        else:
            fail(where, spec, "must be a list of choices or a range {low: .., high: ..}")
    return tuple(params)


def _parse_range(where: str, key: str, spec: Mapping[str, Any]) -> SearchParam:
    allowed = ("low", "high", "log", "step")
    for name in spec:
        if name not in allowed:
            raise ConfigError(unknown_key(f"{where}.{name}", [f"{where}.{a}" for a in allowed]))
    if "low" not in spec or "high" not in spec:
        fail(where, dict(spec), "a range needs both low and high")
    kind = _field_type(key)
    if kind not in (int, float):
        fail(
            where,
            dict(spec),
            "a range {low, high} needs a numeric key; give a list of choices",
        )
    low = coerce(f"{where}.low", spec["low"], kind)
    high = coerce(f"{where}.high", spec["high"], kind)
    log = coerce(f"{where}.log", spec.get("log", False), bool)
    step = spec.get("step")
    if step is not None:
        step = coerce(f"{where}.step", step, kind)
    return SearchParam(key, low=low, high=high, log=log, step=step)


def unknown_key(key: str, known: list[str], what: str = "key") -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f"; allowed: {', '.join(known)}"
    return f"{key}: unknown {what}{hint}"


def _split_key(key: str) -> tuple[str, str]:
    if key not in all_keys():
        raise ConfigError(unknown_key(key, all_keys()))
    section, _, name = key.partition(".")
    return section, name or key


def _coerced(section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: coerce_field(f"{section}.{name}", value) for name, value in values.items()}


def coerce_field(key: str, value: Any) -> Any:
    if key == "study.search":
        return _parse_search(value)
    return coerce(key, value, _field_type(key))


def fields_of(cls: type) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


@functools.cache
def _field_type(key: str) -> Any:
    section, name = key.split(".", 1)
    cls = next(s for s in SECTIONS if s.SECTION == section)
    return typing.get_type_hints(cls)[name]
