"""The search space: a searched key's choices or range (`SearchParam`), and the check that
every combination of values a study can ask is valid, by the config's own rules."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config.checks import ConfigError

# A section's searched keys are checked together for every distinct combination of their values
# up to this many; beyond, at every corner, along each key's values in order and at seeded draws.
EXACT_COMBINATIONS = 20_000
SPREAD_COMBINATIONS = 1_000


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


@functools.lru_cache(maxsize=256)
def check_combinations(section: Any, params: tuple[SearchParam, ...]) -> None:
    """Every combination of the values that a section's searched keys can take together is
    valid in that section: each is checked by building the section, so that the rules are the
    section's own. A section's checks read its own fields only, so the keys of different sections
    never meet in one rule, and a grid's size never multiplies this work."""
    names = [p.key.partition(".")[2] for p in params]
    for combination in _combinations(params):
        try:
            dataclasses.replace(section, **dict(zip(names, combination, strict=True)))
        except ConfigError as error:
            point = ", ".join(f"{p.key}={v!r}" for p, v in zip(params, combination, strict=True))
            raise ConfigError(f"study.search: {point}: {error}") from None


def _combinations(params: tuple[SearchParam, ...]) -> Iterator[tuple]:
    """The combinations of values to check: all of them when they are few enough; else every
    corner (where a rule that holds up to a bound fails), each key's values in order from its
    low end, together (where a rule such as a multiple of the batch size fails first), and draws
    with a fixed seed."""
    values = [_values(p) for p in params]
    sizes = [len(v) if v is not None else math.inf for v in values]
    if math.prod(sizes) <= EXACT_COMBINATIONS:
        yield from itertools.product(*values)
        return
    yield from itertools.product(*(_ends(p, v) for p, v in zip(params, values, strict=True)))
    for i in range(SPREAD_COMBINATIONS):
        yield tuple(_nth(p, v, i) for p, v in zip(params, values, strict=True))
    draws = random.Random(0)
    for _ in range(SPREAD_COMBINATIONS):
        yield tuple(_draw(p, v, draws) for p, v in zip(params, values, strict=True))


def _values(param: SearchParam) -> Sequence[Any] | None:
    """Every value a searched key can take: its choices, or an integer range's values; None for
    a range of floats."""
    if param.choices is not None:
        return param.choices
    if isinstance(param.low, int) and isinstance(param.high, int):
        return range(param.low, param.high + 1, int(param.step or 1))
    return None


def _ends(param: SearchParam, values: Sequence[Any] | None) -> Sequence[Any]:
    if values is None or isinstance(values, range):
        return (param.low, values[-1] if values else param.high)
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    return (min(values), max(values)) if numeric else values


def _nth(param: SearchParam, values: Sequence[Any] | None, i: int) -> Any:
    if values is not None:
        return values[i % len(values)]
    return _between(param, i / SPREAD_COMBINATIONS)


def _draw(param: SearchParam, values: Sequence[Any] | None, draws: random.Random) -> Any:
    return draws.choice(values) if values is not None else _between(param, draws.random())


def _between(param: SearchParam, fraction: float) -> float:
    """The value `fraction` of the way from a float range's low to its high end (in log space
    for a log range)."""
    if param.log:
        return math.exp(math.log(param.low) + fraction * math.log(param.high / param.low))
    return param.low + fraction * (param.high - param.low)


def short_name(key: str) -> str:
    """The name a dotted key goes by in Parquet columns and Optuna params."""
    return key.rsplit(".", 1)[-1]
