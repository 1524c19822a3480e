"""The config's one-line errors, and the checks and conversions of single values that every
section uses."""

from __future__ import annotations

import math
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A config, override or path that cannot be used; the message is one line for the user."""


def fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{key} = {value!r}: {allowed}")


def coerce(key: str, value: Any, kind: Any) -> Any:
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
        fail(key, value, f"must be {_describe(kinds)}")
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
            fail(key, value, "must be a finite number")
    if int in kinds and isinstance(value, float) and value.is_integer():
        return int(value)
    if str in kinds and isinstance(value, str):
        return value
    fail(key, value, f"must be {_describe(kinds)}")


def _as_float(value: Any) -> float | None:
    if isinstance(value, int | float | str):
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits: no float holds it
            return math.inf
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


def require_int(obj: Any, name: str, minimum: int, maximum: int | None = None) -> None:
    value = getattr(obj, name)
    key = f"{obj.SECTION}.{name}"
    if not isinstance(value, int) or isinstance(value, bool):
        fail(key, value, "must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        fail(key, value, f"must be an integer {bound}")


def require_float(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    key = f"{obj.SECTION}.{name}"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        fail(key, value, "must be a finite number")


def require_bool(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bool):
        fail(f"{obj.SECTION}.{name}", value, "must be true or false")


def require_choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        fail(f"{obj.SECTION}.{name}", value, f"must be one of {', '.join(choices)}")


def kind_of(value: Any) -> str:
    return {list: "a list", dict: "a mapping", str: "a string"}.get(
        type(value), type(value).__name__
    )


def reason_of(error: BaseException) -> str:
    return getattr(error, "strerror", None) or type(error).__name__


def first_line(error: BaseException) -> str:
    """The first line of an error's message, for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
