"""Reading a config: a YAML file, `--set key=value` overrides, and keys read under an old
name."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.checks import ConfigError, kind_of, reason_of
from pipeline.config.sections import (
    SECTIONS,
    Config,
    all_keys,
    coerce_field,
    fields_of,
    searchable_keys,
    unknown_key,
)

# Keys read under an old name: what they are called now.
RENAMED_KEYS = {"ray.cpus_per_trial": "ray.cpus_per_trainer"}

log = logging.getLogger(__name__)


def config_from_dict(raw: Any, source: str = "config") -> Config:
    """Build and validate a Config from the plain mapping of a YAML file."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: must be a mapping of sections, got {kind_of(raw)}")
    known = [s.SECTION for s in SECTIONS] + ["output"]
    for name in raw:
        if name not in known:
            raise ConfigError(unknown_key(str(name), known))
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
        raise ConfigError(f"{path}: cannot be read ({reason_of(error)})") from None
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
        raise ConfigError(f"{path}: must be a mapping of sections, got {kind_of(raw)}")
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
    key = _current_name(key)
    search_prefix = "study.search."
    if key.startswith(search_prefix):
        searched = key[len(search_prefix) :]
        if searched not in searchable_keys():
            raise ConfigError(unknown_key(searched, searchable_keys(), what="searchable key"))
    elif key not in all_keys():
        raise ConfigError(unknown_key(key, all_keys()))
    return key, parsed


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    if key == "output":
        raw["output"] = value
        return
    section, name = key.split(".", 1)
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"{section}: must be a mapping, got {kind_of(target)}")
    if name.startswith("search."):
        search = target.setdefault("search", {})
        if not isinstance(search, dict):
            raise ConfigError(f"study.search: must be a mapping, got {kind_of(search)}")
        search[name[len("search.") :]] = value
    else:
        target[name] = value


def _current_name(key: str) -> str:
    """A key's current name; a renamed key is still read, with a one-line notice."""
    if key not in RENAMED_KEYS:
        return key
    log.warning("%s is now called %s; reading it as that", key, RENAMED_KEYS[key])
    return RENAMED_KEYS[key]


def _build_section(cls: type, raw: Any) -> Any:
    section = cls.SECTION
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{section}: must be a mapping of keys to values, got {kind_of(raw)}")
    names = [f.name for f in fields_of(cls)]
    values = {}
    for name, value in raw.items():
        name = _current_name(f"{section}.{name}").partition(".")[2]
        if name not in names:
            raise ConfigError(unknown_key(f"{section}.{name}", [f"{section}.{n}" for n in names]))
        values[name] = coerce_field(f"{section}.{name}", value)
    return cls(**values)
