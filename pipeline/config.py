"""The study's configuration: frozen dataclasses loaded from YAML, with `--set key=value` overrides.

Every value is checked when the config is loaded, so a typo or an impossible value fails at once
with one line that names the key, the value and what is allowed, before anything is written.
The dotted keys (`task.echo_step`, `model.num_layers`, ...) are the public vocabulary: the CLI's
`--set`, the search space and the Parquet column names all use them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    """A config, override or path that cannot be used; the message is one line for the user."""


def _fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{key} = {value!r}: {allowed}")


# What a key means to a trainer, kept on the field itself so that every list of keys below
# derives from one source (a new field cannot be forgotten in one of them):
#   LANE    may differ between the trials that train side by side in one trainer;
#   SHARED  fixes the tensors' shapes or the data's layout: one trainer's lanes share it;
#   RUN     says how much runs and where, not what is computed: it may change between runs
#           into one output, and it is never searched.
LANE, SHARED, RUN = "lane", "shared", "run"


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
        _require_int(self, "series_length", minimum=1)
        _require_int(self, "batch_size", minimum=1)
        _require_int(self, "truncation", minimum=1)
        _require_int(self, "echo_step", minimum=0)
        if self.echo_step >= self.series_length:
            _fail(
                "task.echo_step",
                self.echo_step,
                f"must be < task.series_length ({self.series_length})",
            )
        if self.series_length % self.batch_size:
            _fail(
                "task.series_length",
                self.series_length,
                f"must be a multiple of task.batch_size ({self.batch_size})",
            )
        if self.windows_per_epoch < 1:
            _fail(
                "task.series_length",
                self.series_length,
                f"too short for one window: needs at least batch_size × truncation "
                f"= {self.batch_size * self.truncation}",
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
        _require_int(self, "num_layers", minimum=1)
        _require_int(self, "state_size", minimum=1)


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
        _require_int(self, "epochs", minimum=1)
        _require_float(self, "lr")
        if not self.lr > 0:
            _fail("train.lr", self.lr, "must be a finite number > 0")
        _require_int(self, "seed", minimum=0, maximum=2**63 - 1)
        _require_bool(self, "carry_state")
        if not isinstance(self.device, str) or not (
            self.device in self.DEVICES
            or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            _fail("train.device", self.device, "must be one of auto, cpu, cuda, cuda:N")
        if not (self.compile is True or self.compile is False or self.compile == "auto"):
            _fail("train.compile", self.compile, "must be true, false or auto")
        _require_int(self, "log_every", minimum=1)


SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("none", "median", "hyperband")
OBJECTIVES = ("final_loss", "mean_loss")
SEARCHABLE_SECTIONS = (TaskConfig, ModelConfig, TrainConfig)


@dataclass(frozen=True)
class SearchParam:
    """One searched key: a list of choices (a grid axis) or a numeric range."""

    key: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def short_name(self) -> str:
        """The column name in Parquet and the parameter name in Optuna: `model.num_layers` →
        `num_layers`."""
        return short_name(self.key)

    def to_yaml(self) -> Any:
        if self.choices is not None:
            return list(self.choices)
        spec: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            spec["log"] = True
        if self.step is not None:
            spec["step"] = self.step
        return spec


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
            _fail("study.name", self.name, "must be a non-empty string")
        if self.trials is not None:
            _require_int(self, "trials", minimum=1)
        _require_choice(self, "sampler", SAMPLERS)
        _require_choice(self, "pruner", PRUNERS)
        _require_choice(self, "objective", OBJECTIVES)
        _require_int(self, "seed", minimum=0, maximum=2**32 - 1)
        if self.storage is not None and (not isinstance(self.storage, str) or not self.storage):
            _fail("study.storage", self.storage, "must be an Optuna storage URL or null")
        if self.lanes_per_trainer is not None:
            _require_int(self, "lanes_per_trainer", minimum=1, maximum=4096)
        _require_int(self, "report_every", minimum=1)
        _require_bool(self, "only_writer")
        if self.sampler == "grid":
            ranges = [p.key for p in self.search if p.choices is None]
            if ranges:
                _fail(
                    f"study.search.{ranges[0]}",
                    self.search_param(ranges[0]).to_yaml(),
                    "the grid sampler needs a list of choices, not a range",
                )
            if self.trials is not None and self.trials > self.grid_size:
                _fail(
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
        _require_float(self, "threshold")
        if not self.threshold > 0:
            _fail("convergence.threshold", self.threshold, "must be a finite number > 0")
        _require_int(self, "window", minimum=1)


@dataclass(frozen=True)
class RayConfig:
    """Where trials run: an embedded Ray on this machine, or an existing cluster."""

    SECTION: ClassVar[str] = "ray"

    address: str | None = _field(None, RUN)
    """null: start Ray embedded here; `auto`, `ray://host:port` or host:port: join that cluster."""
    cpus_per_trial: int = _field(1, RUN)
    """CPUs each trainer asks of Ray (a trainer trains many trials side by side), and torch's
    thread count inside it."""
    gpus_per_trainer: float | None = _field(None, RUN)
    """GPUs (a fraction is fine) each trainer asks of Ray; default: 1 when train.device asks for
    CUDA, or is auto on a cluster with GPUs, else 0."""
    num_cpus: int | None = _field(None, RUN)
    """CPUs of the embedded Ray (default: all of this machine's); ignored on a cluster."""
    max_retries: int = _field(2, RUN)
    """Times a trial whose trainer died (worker or node lost) runs again before it is FAIL."""
    dashboard: bool = _field(False, RUN)
    """Start the Ray dashboard (on 127.0.0.1) with the embedded Ray."""

    def __post_init__(self) -> None:
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            _fail(
                "ray.address",
                self.address,
                "must be auto, ray://host:port, host:port or null",
            )
        _require_int(self, "cpus_per_trial", minimum=1)
        if self.gpus_per_trainer is not None:
            _require_float(self, "gpus_per_trainer")
            if not 0 <= self.gpus_per_trainer <= 64:
                _fail("ray.gpus_per_trainer", self.gpus_per_trainer, "must be between 0 and 64")
        if self.num_cpus is not None:
            _require_int(self, "num_cpus", minimum=1)
        _require_int(self, "max_retries", minimum=0)
        _require_bool(self, "dashboard")


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
            _fail("output", self.output, "must be a folder path or a URI")

    def check_search(self) -> Config:
        """This config, once every searched value is valid in it (each section is valid with
        that value in it); raises ConfigError otherwise. Done when a config is loaded or its
        study changes, not for each trial's config, which would check the whole grid again."""
        for param in self.study.search:
            self._check_search_param(param)
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
            raw[section.SECTION] = {f.name: getattr(values, f.name) for f in _fields(section)}
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
            _fail(where, param.to_yaml(), "needs low < high")
        if param.log and param.low <= 0:
            _fail(where, param.to_yaml(), "a log range needs low > 0")
        if param.log and param.step is not None:
            _fail(where, param.to_yaml(), "takes log or step, not both")
        if param.step is not None and not param.step > 0:
            _fail(where, param.to_yaml(), "needs step > 0")

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


def short_name(key: str) -> str:
    """The name a dotted key goes by in Parquet columns and Optuna params."""
    return key.rsplit(".", 1)[-1]


def searchable_keys() -> list[str]:
    """Dotted keys a study may vary: what a trial computes, never how or where it runs."""
    keys = [f"{s.SECTION}.{f.name}" for s in SEARCHABLE_SECTIONS for f in _fields(s)]
    return [k for k in keys if k not in RUN_KEYS]


def all_keys() -> list[str]:
    """Every dotted key of the vocabulary."""
    return [f"{s.SECTION}.{f.name}" for s in SECTIONS for f in _fields(s)] + ["output"]


def config_from_dict(raw: Any, source: str = "config") -> Config:
    """Build and validate a Config from the plain mapping of a YAML file."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: must be a mapping of sections, got {_kind(raw)}")
    known = [s.SECTION for s in SECTIONS] + ["output"]
    for name in raw:
        if name not in known:
            raise ConfigError(_unknown_key(str(name), known))
    sections = {s.SECTION: _build_section(s, raw.get(s.SECTION)) for s in SECTIONS}
    output = raw.get("output", Config.output)
    return Config(**sections, output=output).check_search()


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config and apply `key=value` overrides; raise ConfigError on any problem."""
    raw = read_yaml(path)
    for override in overrides:
        key, value = parse_override(override)
        _set_dotted(raw, key, value)
    return config_from_dict(raw, source=str(path))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file, with unreadable and malformed files reported in one line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; expected a YAML config") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({_reason(error)})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "malformed"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {_kind(raw)}")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """`model.num_layers=2` → ("model.num_layers", 2); the value is read as YAML."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. model.num_layers=2")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML") from None
    search_prefix = "study.search."
    if key.startswith(search_prefix):
        searched = key[len(search_prefix) :]
        if searched not in searchable_keys():
            raise ConfigError(_unknown_key(searched, searchable_keys(), what="searchable key"))
    elif key not in all_keys():
        raise ConfigError(_unknown_key(key, all_keys()))
    return key, parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    if key == "output":
        raw["output"] = value
        return
    section, name = key.split(".", 1)
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"{section}: must be a mapping, got {_kind(target)}")
    if name.startswith("search."):
        search = target.setdefault("search", {})
        if not isinstance(search, dict):
            raise ConfigError(f"study.search: must be a mapping, got {_kind(search)}")
        search[name[len("search.") :]] = value
    else:
        target[name] = value


def _build_section(cls: type, raw: Any) -> Any:
    section = cls.SECTION
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{section}: must be a mapping of keys to values, got {_kind(raw)}")
    names = [f.name for f in _fields(cls)]
    values = {}
    for name, value in raw.items():
        if name not in names:
            raise ConfigError(_unknown_key(f"{section}.{name}", [f"{section}.{n}" for n in names]))
        values[name] = _coerce_field(f"{section}.{name}", value)
    return cls(**values)


def _parse_search(raw: Any) -> tuple[SearchParam, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"study.search: must be a mapping of dotted keys, got {_kind(raw)}")
    params = []
    for key, spec in raw.items():
        key = str(key)
        if key not in searchable_keys():
            raise ConfigError(_unknown_key(key, searchable_keys(), what="searchable key"))
        where = f"study.search.{key}"
        if isinstance(spec, list | tuple):
            if not spec:
                _fail(where, spec, "needs at least one choice")
            if len(set(map(repr, spec))) != len(spec):
                _fail(where, spec, "lists a choice twice")
            kind = _field_type(key)
            choices = tuple(_coerce(where, choice, kind) for choice in spec)
            params.append(SearchParam(key, choices=choices))
        elif isinstance(spec, Mapping):
            params.append(_parse_range(where, key, spec))
        else:
            _fail(where, spec, "must be a list of choices or a range {low: .., high: ..}")
    return tuple(params)


def _parse_range(where: str, key: str, spec: Mapping[str, Any]) -> SearchParam:
    allowed = ("low", "high", "log", "step")
    for name in spec:
        if name not in allowed:
            raise ConfigError(_unknown_key(f"{where}.{name}", [f"{where}.{a}" for a in allowed]))
    if "low" not in spec or "high" not in spec:
        _fail(where, dict(spec), "a range needs both low and high")
    kind = _field_type(key)
    if kind not in (int, float):
        _fail(
            where,
            dict(spec),
            "a range {low, high} needs a numeric key; give a list of choices",
        )
    low = _coerce(f"{where}.low", spec["low"], kind)
    high = _coerce(f"{where}.high", spec["high"], kind)
    log = _coerce(f"{where}.log", spec.get("log", False), bool)
    step = spec.get("step")
    if step is not None:
        step = _coerce(f"{where}.step", step, kind)
    return SearchParam(key, low=low, high=high, log=log, step=step)


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check a YAML value against a field's type; numbers in strings like "1e-3" are accepted,
    since YAML 1.1 reads an exponent without a dot as a string."""
    kinds = (
        typing.get_args(kind)
        if typing.get_origin(kind) in (typing.Union, types.UnionType)
        else (kind,)
    )
    if value is None:
        if type(None) in kinds:
            return None
        _fail(key, value, f"must be {_describe(kinds)}")
    if bool in kinds and isinstance(value, bool):
        return value
    if str in kinds and isinstance(value, str) and not (float in kinds or int in kinds):
        return value
    if int in kinds and isinstance(value, int) and not isinstance(value, bool):
        return value
    if float in kinds and not isinstance(value, bool):
        number = _as_float(value)
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            _fail(key, value, "must be a finite number")
    if int in kinds and isinstance(value, float) and value.is_integer():
        return int(value)
    if str in kinds and isinstance(value, str):
        return value
    _fail(key, value, f"must be {_describe(kinds)}")


def _as_float(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _describe(kinds: tuple[Any, ...]) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
    }
    words = [names[k] for k in kinds if k in names]
    if type(None) in kinds:
        words.append("null")
    return " or ".join(words)


def _require_int(obj: Any, name: str, minimum: int, maximum: int | None = None) -> None:
    value = getattr(obj, name)
    key = f"{obj.SECTION}.{name}"
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(key, value, "must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        _fail(key, value, f"must be an integer {bound}")


def _require_float(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    key = f"{obj.SECTION}.{name}"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _fail(key, value, "must be a finite number")


def _require_bool(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bool):
        _fail(f"{obj.SECTION}.{name}", value, "must be true or false")


def _require_choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        _fail(f"{obj.SECTION}.{name}", value, f"must be one of {', '.join(choices)}")


def _unknown_key(key: str, known: list[str], what: str = "key") -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f"; allowed: {', '.join(known)}"
    return f"{key}: unknown {what}{hint}"


def _split_key(key: str) -> tuple[str, str]:
    if key not in all_keys():
        raise ConfigError(_unknown_key(key, all_keys()))
    section, _, name = key.partition(".")
    return section, name or key


def _coerced(section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: _coerce_field(f"{section}.{name}", value) for name, value in values.items()}


def _coerce_field(key: str, value: Any) -> Any:
    if key == "study.search":
        return _parse_search(value)
    return _coerce(key, value, _field_type(key))


def _fields(cls: type) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


@functools.cache
def _field_type(key: str) -> Any:
    section, name = key.split(".", 1)
    cls = next(s for s in SECTIONS if s.SECTION == section)
    return typing.get_type_hints(cls)[name]


def _kind(value: Any) -> str:
    return {list: "a list", dict: "a mapping", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or type(error).__name__
