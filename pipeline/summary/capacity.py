"""The capacity frontier: per depth and state size, the largest echo step that most trials
learned. The echo task asks the network to hold the last `echo_step` input bits, so each state
size should have a largest echo step it can learn; this table says where it lies, and how sure
that is, from the group table's Kaplan–Meier fractions (the same estimate its rows show).

Its table (`capacity_table`), its finding and its Markdown table live here; the figure is
plots.capacity_frontier_figure.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd

ARCHITECTURE = ["num_layers", "state_size"]
# Columns at the frontier's echo step, then at the next echo step run.
AT_STEP = ["converged_fraction", "converged_fraction_low", "converged_fraction_high"]
CAPACITY_COLUMNS = [
    "largest_echo_step",
    *AT_STEP,
    "next_echo_step",
    *(f"next_{column}" for column in AT_STEP),
]
# Fractions this close are equal: Kaplan–Meier products of ratios are not exact.
_TOLERANCE = 1e-9


def varies_capacity(table: pd.DataFrame) -> bool:
    """Whether a study's group table varies both state size and echo step: only then has the
    capacity frontier anything to say."""
    return all(table[key].nunique() > 1 for key in ("state_size", "echo_step"))


def capacity_table(table: pd.DataFrame, keys: Sequence[str] = ARCHITECTURE) -> pd.DataFrame:
    """Per `keys` (depth and state size, and truncation when it varies), the largest echo step
    where a majority converged (Kaplan–Meier fraction above one half), with the fraction and
    its 95 % interval there and at the next echo step run. `largest_echo_step` is null where no
    echo step had a majority; `next_echo_step` null where the frontier is the largest run.
    `table`: groups.group_table rows by the factors, echo_step among them."""
    rows = []
    for key, group in table[table["trained"] > 0].groupby(list(keys), sort=True):
        group = group.sort_values("echo_step")
        majority = group[group["converged_fraction"] > 0.5 + _TOLERANCE]
        row = dict(zip(keys, key, strict=True))
        at = majority.iloc[-1] if len(majority) else None
        after = group[group["echo_step"] > at["echo_step"]] if at is not None else group
        following = after.iloc[0] if len(after) else None
        row["largest_echo_step"] = at["echo_step"] if at is not None else np.nan
        row["next_echo_step"] = following["echo_step"] if following is not None else np.nan
        for column in AT_STEP:
            row[column] = at[column] if at is not None else np.nan
            row[f"next_{column}"] = following[column] if following is not None else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=[*keys, *CAPACITY_COLUMNS])


def capacity_finding(capacity: pd.DataFrame, epochs: int, truncation: int | None) -> str:
    """One sentence: the frontier per depth over state size, whether it grows with state size
    and with depth, and where the 95 % intervals make the step clear (one side of one half at
    the echo step between two frontiers for each)."""
    boundary = f"; truncation {truncation}" if truncation is not None else ""
    parts, growth = [], []
    for layers, rows in capacity.groupby("num_layers", sort=True):
        rows = rows.sort_values("state_size")
        reach = [f"{_echo(r)} at {r['state_size']:g}" for r in rows.to_dict("records")]
        parts.append(f"{_layers(layers)}: {', '.join(reach)} units")
        growth.append(f"{_layers(layers)} {_growth(rows)}")
    sentence = (
        f"Capacity frontier, the largest echo step where a majority converged within {epochs} "
        f"epochs{boundary} (– where none did): {'; '.join(parts)}. With state size, "
        f"{'; '.join(growth)}."
    )
    sentence += _capped_clause(capacity, truncation)
    depth = _depth_clause(capacity)
    return f"{sentence} {depth}" if depth else sentence


def capacity_markdown(capacity: pd.DataFrame) -> list[str]:
    """The capacity table in Markdown: the frontier and the fractions at it and past it."""
    keys = [key for key in capacity.columns if key not in CAPACITY_COLUMNS]
    headers = [*(key.replace("_", " ").replace("num ", "") for key in keys)]
    headers += ["largest echo step learned", "converged there", "next echo step", "converged"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---:|" * len(headers)]
    for row in capacity.to_dict("records"):
        cells = [f"{row[key]:g}" for key in keys]
        cells += [_echo(row), _fraction(row, ""), _number(row["next_echo_step"])]
        cells.append(_fraction(row, "next_"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def clearly_further(near: dict | pd.Series, far: dict | pd.Series) -> bool:
    """Whether `far` clearly reaches a larger echo step than `near`: `near`'s 95 % interval
    lies below one half at the echo step past its frontier, and `far`'s lies above one half at
    its own frontier, at or beyond that step."""
    step = near["next_echo_step"]
    if pd.isna(step) or _reach(far) < step:
        return False
    return bool(near["next_converged_fraction_high"] < 0.5 < far["converged_fraction_low"])


def _growth(rows: pd.DataFrame) -> str:
    """How one depth's frontier changes from each state size to the next."""
    records = rows.to_dict("records")
    pairs = list(itertools.pairwise(records))
    if not pairs:
        return "a single state size"
    further = [(a, b) for a, b in pairs if _reach(b) > _reach(a)]
    clear = [(a, b) for a, b in further if clearly_further(a, b)]
    less = [(a, b) for a, b in pairs if _reach(b) < _reach(a)]
    first, last = records[0], records[-1]
    text = (
        f"from {_echo(first)} at {first['state_size']:g} to {_echo(last)} at "
        f"{last['state_size']:g} units: {len(further)} of {len(pairs)} steps up in state size "
        f"reach further ({len(clear)} clearly)"
    )
    if less:
        text += f", {len(less)} less far"
    return text


def _depth_clause(capacity: pd.DataFrame) -> str:
    depths = sorted(capacity["num_layers"].unique())
    if len(depths) < 2:
        return ""
    shallow, deep = depths[0], depths[-1]
    by = capacity.set_index(["num_layers", "state_size"])
    sizes = sorted(set(by.loc[shallow].index) & set(by.loc[deep].index))
    further, same, less, clear = [], [], [], []
    for size in sizes:
        a, b = by.loc[(shallow, size)], by.loc[(deep, size)]
        if _reach(b) > _reach(a):
            further.append(size)
            clear += [size] if clearly_further(a, b) else []
        elif _reach(b) < _reach(a):
            less.append(size)
        else:
            same.append(size)
    parts = [f"further at {_sizes(further)} ({_sizes(clear) if clear else 'none'} clearly)"]
    parts += [f"as far at {_sizes(same)}"] if same else []
    parts += [f"less far at {_sizes(less)}"] if less else []
    return f"{_layers(deep)} against {_layers(shallow)}: {', '.join(parts)}."


def _capped_clause(capacity: pd.DataFrame, truncation: int | None) -> str:
    """Where a network learned the largest echo step run, what stops its frontier: the
    truncation when that step is the last below it (truncated BPTT cannot learn one at or past
    it), else the grid."""
    capped = capacity[capacity["largest_echo_step"].notna() & capacity["next_echo_step"].isna()]
    if not len(capped):
        return ""
    names = [f"{_layers(r['num_layers'])} × {r['state_size']:g} units" for r in _rows(capped)]
    if truncation is not None and (capped["largest_echo_step"] == truncation - 1).all():
        return (
            f" {_and(names)} learned every echo step below the truncation ({truncation}), the "
            "most truncated BPTT can learn, so the truncation, not the network, stops the "
            "frontier there."
        )
    return (
        f" {_and(names)} learned every echo step run, so the grid, not the network, stops the "
        "frontier there."
    )


def _rows(frame: pd.DataFrame) -> list[dict]:
    return frame.to_dict("records")


def _reach(row: dict | pd.Series) -> float:
    return -1.0 if pd.isna(row["largest_echo_step"]) else float(row["largest_echo_step"])


def _echo(row: dict | pd.Series) -> str:
    return _number(row["largest_echo_step"])


def _fraction(row: dict, prefix: str) -> str:
    value = row[f"{prefix}converged_fraction"]
    if pd.isna(value):
        return "–"
    low, high = row[f"{prefix}converged_fraction_low"], row[f"{prefix}converged_fraction_high"]
    return f"{value:.0%} ({low:.0%}–{high:.0%})"


def _number(value: float) -> str:
    return "–" if pd.isna(value) else f"{value:g}"


def _layers(count: float) -> str:
    return f"{count:g} layer{'' if count == 1 else 's'}"


def _and(parts: Sequence[str]) -> str:
    parts = list(parts)
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _sizes(sizes: Sequence[float]) -> str:
    values = [f"{size:g}" for size in sizes]
    if not values:
        return "no state size"
    return f"{_and(values)} unit{'' if values == ['1'] else 's'}"
