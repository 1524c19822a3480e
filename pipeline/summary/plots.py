"""Figures, drawn with matplotlib's object API on the Agg canvas (no display, no global state)."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator, NullLocator, PercentFormatter

from pipeline.training.data import LN2

if TYPE_CHECKING:
    from pipeline.summary.survival import Survival


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes, ready for an atomic write.

    Its layout is computed once, then frozen: savefig would otherwise run the layout engine in
    each of its two draws (one to lay out, one to render), and constrained layout, which
    measures every tick label, was half of a summary's time."""
    FigureCanvasAgg(figure)
    engine = figure.get_layout_engine()
    if engine is not None:
        engine.execute(figure)
        figure.set_layout_engine(None)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def training_figure(
    losses: np.ndarray, x: np.ndarray, y: np.ndarray, margin: np.ndarray, title: str
) -> Figure:
    """The tutorial's figure: the loss curve, then input (blue), target (red) and prediction
    (green) bars for each batch row of the last window. x, y, margin: (B, T)."""
    rows = min(len(x), 5)
    figure = Figure(figsize=(12, 6), layout="constrained")
    figure.suptitle(title)
    axes = figure.subplots(2, 3).ravel()
    curve = axes[0]
    curve.plot(np.arange(len(losses)), losses, linewidth=0.6)
    curve.set_yscale("log")
    curve.set(title="Batch loss", xlabel="step (window)", ylabel="cross-entropy")
    steps = np.arange(x.shape[1])
    predicted = (margin > 0).astype(float)
    for row, ax in enumerate(axes[1 : rows + 1]):
        ax.bar(steps, x[row], width=1, color="blue", label="input")
        ax.bar(steps, y[row] * 0.5, width=1, color="red", label="target")
        ax.bar(steps, predicted[row] * 0.3, width=1, color="green", label="prediction")
        ax.set(
            xlim=(-0.5, len(steps) - 0.5),
            ylim=(0, 2),
            title=f"batch row {row}",
            xlabel="t",
        )
    axes[1].legend(loc="upper right", fontsize="small")
    for ax in axes[rows + 1 :]:
        ax.set_visible(False)
    return figure


_LINE_STYLES = ("-", "--", ":", "-.")
# Lines of more levels than this get a colour scale instead of a legend.
_MAX_LEGEND = 8
_MARKERS = ("o", "s", "^", "D", "v", "P")
_NEVER = {"facecolor": "0.88", "edgecolor": "0.55", "hatch": "///", "linewidth": 0.0}


def loss_curves_figure(
    curves: pd.DataFrame,
    threshold: float,
    window: int,
    truncation: int | None,
    epoch_steps: int | None,
    title: str,
) -> Figure:
    """Small multiples, one panel per echo step: the median moving-average loss of each
    architecture (colour: layers, or truncation when `curves` has it; line style: state size)
    with its inter-quartile band, on a log scale. `curves` as summary.loss_curves makes it."""
    colour_key = "truncation" if "truncation" in curves else "num_layers"
    colour_word = "truncation" if colour_key == "truncation" else "layer"
    echo_steps = sorted(curves["echo_step"].unique()) or [None]
    layers = sorted(curves[colour_key].unique())
    sizes = sorted(curves["state_size"].unique())
    line_keys = [k for k in curves.columns if k in ("num_layers", "state_size", "truncation")]
    figure, axes = _panels(len(echo_steps), width=3.8, height=3.0, sharey=True)
    figure.suptitle(
        f"{title}: median loss per architecture\n"
        f"{window}-step moving average; band: inter-quartile range over trials"
    )
    colours = colormaps["tab10"]
    for ax, echo in zip(axes, echo_steps, strict=False):
        panel = curves[curves["echo_step"] == echo]
        for key, every_step in panel.groupby(line_keys):
            rows = _thinned(every_step, CURVE_POINTS)
            line = dict(zip(line_keys, key, strict=True))
            state_size = line["state_size"]
            colour = colours(layers.index(line[colour_key]) % 10)
            ax.fill_between(rows["step"], rows["q25"], rows["q75"], color=colour, alpha=0.18, lw=0)
            ax.plot(
                rows["step"],
                rows["median"],
                color=colour,
                linestyle=_LINE_STYLES[sizes.index(state_size) % len(_LINE_STYLES)],
                linewidth=1.3,
            )
        if epoch_steps and not panel.empty:
            for start in range(epoch_steps, int(panel["step"].max()) + 1, epoch_steps):
                ax.axvline(start, color="0.85", linewidth=0.8, zorder=0)
        ax.axhline(LN2, color="0.3", linestyle=":", linewidth=1)
        ax.axhline(threshold, color="crimson", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        # No minor ticks: hardly visible between the decades here, and laying them out and
        # drawing them took 40 % of this figure's time (configs/study.yaml: 0.58 s, 0.34 without).
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_title(_echo_title(echo, truncation))
        if panel.empty:
            ax.text(0.5, 0.5, "no trained trials", ha="center", va="center", transform=ax.transAxes)
    _label_outer(axes, xlabel="step (window)", ylabel="cross-entropy loss")
    handles = [
        Line2D([], [], color=colours(layers.index(n) % 10), label=_legend(n, colour_word))
        for n in layers
    ]
    if len(sizes) > 1:
        handles += [
            Line2D([], [], color="0.3", linestyle=_LINE_STYLES[i % 4], label=f"{s} units")
            for i, s in enumerate(sizes)
        ]
    handles += [
        Patch(color="0.3", alpha=0.18, label="inter-quartile range"),
        Line2D([], [], color="0.3", linestyle=":", label="ln 2 (chance)"),
        Line2D([], [], color="crimson", linestyle="--", label=f"threshold {threshold:g}"),
    ]
    if epoch_steps:
        handles.append(Line2D([], [], color="0.85", label="epoch start"))
    figure.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(len(handles), 3 * axes[0].get_gridspec().ncols, 6),
        fontsize="small",
    )
    return figure


# Points drawn per curve: a panel is under 400 pixels wide, and the curves are moving averages
# over `window` (100) steps, so a study's thousands of steps drawn at most 600 times look the
# same (configs/study.yaml's 3,330 steps: the figure took 0.59 s rather than 0.71).
CURVE_POINTS = 600


def _thinned(rows: pd.DataFrame, points: int) -> pd.DataFrame:
    """At most `points` of `rows`, evenly spaced, the first and the last among them."""
    if len(rows) <= points:
        return rows
    return rows.iloc[np.unique(np.linspace(0, len(rows) - 1, points).round().astype(int))]


def steps_to_converge_figure(table: pd.DataFrame, truncation: int | None, title: str) -> Figure:
    """Heat maps of the median steps to converge over layers × state size, one panel per echo
    step; a cell shows the median and converged/trained, grey and hatched when none converged.
    `table` as summary.parquet."""
    echo_steps = sorted(table["echo_step"].unique())
    layers = sorted(table["num_layers"].unique())
    sizes = sorted(table["state_size"].unique())
    figure, axes = _panels(
        len(echo_steps), width=max(2.6, 0.9 * len(sizes) + 1.4), height=0.7 * len(layers) + 1.6
    )
    figure.suptitle(
        f"{title}: median steps to converge\n"
        "cell: median and converged/trained trials; grey, hatched: fewer than half converged"
    )
    medians = table["median_steps_to_converge"].dropna()
    low, high = (medians.min(), medians.max()) if len(medians) else (0.0, 1.0)
    norm = Normalize(low - 1, high + 1) if low == high else Normalize(low, high)
    cmap = colormaps["viridis"]
    cells = table.set_index(["echo_step", "num_layers", "state_size"])
    for ax, echo in zip(axes, echo_steps, strict=False):
        grid = np.full((len(layers), len(sizes)), np.nan)
        for i, num_layers in enumerate(layers):
            for j, state_size in enumerate(sizes):
                key = (echo, num_layers, state_size)
                row = cells.loc[key] if key in cells.index else None
                grid[i, j] = np.nan if row is None else row["median_steps_to_converge"]
                _heat_cell(ax, i, j, row, norm, cmap)
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, origin="lower", aspect="auto")
        ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
        ax.set_yticks(range(len(layers)), [str(n) for n in layers])
        ax.set_title(_echo_title(echo, truncation))
    _label_outer(axes, xlabel="state size (units)", ylabel="layers")
    if len(medians):
        bar = figure.colorbar(
            ScalarMappable(norm, cmap), ax=axes.tolist(), label="median steps to converge"
        )
        bar.locator = MaxNLocator(integer=True)
    figure.legend(
        handles=[Patch(**_NEVER, label="fewer than half converged")],
        loc="outside lower center",
        fontsize="small",
    )
    return figure


def converged_fraction_figure(table: pd.DataFrame, truncation: int | None, title: str) -> Figure:
    """Converged fraction versus echo step, one line per layer count (pooled over state sizes
    and seeds) with the truncation length marked; or, when the truncation varies (`truncation`
    None and a `truncation` column), one line per truncation, each marked in its colour.
    `table` has that line column, echo_step, trained, converged_fraction and its interval."""
    table = table[table["trained"] > 0]
    key = "num_layers" if truncation is not None else "truncation"
    figure = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = figure.subplots()
    echo_steps = sorted(table["echo_step"].unique())
    layers = sorted(table[key].unique())
    colours = colormaps["tab10"]
    for i, num_layers in enumerate(layers):
        rows = table[table[key] == num_layers].sort_values("echo_step")
        # Lines that coincide stay visible: earlier ones are drawn wider, with larger markers.
        ax.plot(
            rows["echo_step"],
            rows["converged_fraction"],
            color=colours(i % 10),
            marker=_MARKERS[i % len(_MARKERS)],
            markersize=9 - 5 * i / max(1, len(layers) - 1) if len(layers) > 1 else 7,
            linewidth=3.0 - 2.0 * i / max(1, len(layers) - 1) if len(layers) > 1 else 1.5,
            label=_legend(num_layers, "layer" if key == "num_layers" else "truncation"),
        )
        if key == "truncation":
            ax.axvline(num_layers, color=colours(i % 10), linestyle="--", linewidth=1)
    margin = max(1.0, 0.05 * (max(echo_steps, default=1) - min(echo_steps, default=0)))
    left = min(echo_steps, default=0) - margin
    right = max([*echo_steps, truncation or 0]) + margin
    if key == "truncation":
        ax.plot([], [], color="0.3", linestyle="--", linewidth=1, label="echo step = truncation")
    if truncation is not None:
        ax.axvspan(
            truncation,
            right,
            color="0.92",
            zorder=0,
            label=f"echo step ≥ truncation ({truncation}): no gradient links input to target",
        )
        ax.axvline(truncation, color="0.3", linestyle="--", linewidth=1)
    ax.set(
        xlim=(left, right),
        ylim=(-0.05, 1.05),
        xlabel="echo step",
        ylabel="converged fraction of trained trials",
        title=f"{title}: converged fraction versus echo step",
    )
    ax.set_xticks(sorted({*echo_steps, *([truncation] if truncation is not None else [])}))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.grid(axis="y", color="0.9")
    handles, labels = ax.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
    return figure


def _panels(count: int, width: float, height: float, sharey: bool = False):
    """A figure with `count` panels in rows of at most four; the spare ones hidden."""
    columns = min(max(count, 1), 4)
    rows = math.ceil(max(count, 1) / columns)
    # Wide enough for the two-line title even with one panel.
    size = (max(width * columns + 2.2, 6.5), height * rows + 1.2)
    figure = Figure(figsize=size, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True, sharey=sharey).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return figure, axes[: max(count, 1)]


def _label_outer(axes: np.ndarray, xlabel: str, ylabel: str) -> None:
    columns = axes[0].get_gridspec().ncols
    for k, ax in enumerate(axes):
        if k + columns >= len(axes):
            # The last panel of its column: shared x axes hid its tick labels if a row follows.
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel(xlabel)
        if k % columns == 0:
            ax.set_ylabel(ylabel)


def _heat_cell(ax, i: int, j: int, row: pd.Series | None, norm: Normalize, cmap) -> None:
    """Mark a cell that has no colour, and write its numbers."""
    centre = {"ha": "center", "va": "center", "fontsize": "small"}
    if row is None or row["trained"] == 0:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="white", edgecolor="0.7"))
        ax.text(j, i, "not run" if row is None else "no trained\ntrial", color="0.4", **centre)
        return
    counts = f"{row['converged']:.0f}/{row['trained']:.0f}"
    median = row["median_steps_to_converge"]
    if np.isnan(median):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, **_NEVER))
        box = {"facecolor": _NEVER["facecolor"], "edgecolor": "none", "pad": 1.5}
        words = "never" if row["converged"] == 0 else f"> {row['horizon_step']:.0f}"
        ax.text(j, i, f"{words}\n{counts}", color="0.15", bbox=box, **centre)
        return
    red, green, blue, _ = cmap(norm(median))
    dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
    ax.text(j, i, f"{median:.0f}\n{counts}", color="white" if dark else "black", **centre)


def _echo_title(echo: float | None, truncation: int | None) -> str:
    if echo is None:
        return "no data"
    beyond = truncation is not None and echo >= truncation
    return f"echo step {echo:g}" + (f" (≥ truncation {truncation})" if beyond else "")


def _plural(count: float, word: str) -> str:
    return f"{count:g} {word}" + ("" if count == 1 else "s")


def _legend(value: float, word: str) -> str:
    return f"truncation {value:g}" if word == "truncation" else _plural(value, word)


def time_to_converge_figure(survival: dict[str, dict[int, Survival]], title: str) -> Figure:
    """Fraction converged against step (Kaplan–Meier), one panel per factor and one line per
    level, pooled over the other factors; a band is the pointwise 95 % interval, a tick on a
    line a trial censored there (it stopped, or the run ended, before it converged)."""
    factors = [f for f, levels in survival.items() if len(levels) > 1] or list(survival)[:1]
    figure, axes = _panels(len(factors), width=4.6, height=3.4, sharey=True)
    figure.suptitle(
        f"{title}: fraction converged by step (Kaplan–Meier)\n"
        "band: pointwise 95 % interval; |: censored trials (not converged when they stopped)"
    )
    for ax, factor in zip(axes, factors, strict=False):
        word = {"num_layers": "layer", "state_size": "unit"}.get(factor)
        levels = sorted(survival[factor])
        # Many levels (echo steps, say) read better as a colour scale than as a legend.
        scale = Normalize(min(levels), max(levels)) if len(levels) > _MAX_LEGEND else None
        for i, level in enumerate(levels):
            curve = survival[factor][level]
            colour = colormaps["viridis"](scale(level)) if scale else colormaps["tab10"](i % 10)
            steps = np.concatenate([[0], curve.steps, [max(curve.horizon, 0)]])
            fraction = np.concatenate([[0.0], curve.fraction, [curve.final if curve.trials else 0]])
            low = np.concatenate([[0.0], curve.low, [curve.low[-1] if curve.low.size else 0]])
            high = np.concatenate([[0.0], curve.high, [curve.high[-1] if curve.high.size else 0]])
            name = _plural(level, word) if word else f"{factor.replace('_', ' ')} {level:g}"
            ax.step(steps, fraction, where="post", color=colour, linewidth=1.4,
                    label=f"{name} ({curve.trials})")  # fmt: skip
            ax.fill_between(steps, low, high, step="post", color=colour, alpha=0.12, lw=0)
            censored = np.unique(curve.censored)
            ax.plot(censored, [curve.fraction_by(s) for s in censored], linestyle="none",
                    marker="|", markersize=9, color=colour)  # fmt: skip
        ax.set_title(factor.replace("_", " "))
        ax.set_ylim(-0.03, 1.03)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(color="0.92")
        if scale:
            figure.colorbar(ScalarMappable(scale, colormaps["viridis"]), ax=ax,
                            label=factor.replace("_", " "))  # fmt: skip
        elif ax.get_legend_handles_labels()[0]:  # a factor with no trained trial draws none
            ax.legend(fontsize="x-small", title="level (trained trials)", title_fontsize="x-small")
    _label_outer(axes, xlabel="step (window)", ylabel="fraction converged")
    return figure


def truncation_frontier_figure(frontier: pd.DataFrame, title: str) -> Figure:
    """Two maps over (echo step, truncation): the fraction converged and the median steps to
    converge, with the line echo step = truncation drawn; a grey, hatched cell had fewer than
    half of its trials converged (its median is beyond the run). `frontier` as
    summary.Summary.frontier (truncation, echo_step and the statistics)."""
    echo_steps = sorted(int(e) for e in frontier["echo_step"].unique())
    truncations = sorted(int(t) for t in frontier["truncation"].unique())
    cells = frontier.set_index(["truncation", "echo_step"])
    shape = (len(truncations), len(echo_steps))
    fraction, median = np.full(shape, np.nan), np.full(shape, np.nan)
    for i, truncation in enumerate(truncations):
        for j, echo in enumerate(echo_steps):
            if (truncation, echo) in cells.index:
                fraction[i, j] = cells.loc[(truncation, echo), "converged_fraction"]
                median[i, j] = cells.loc[(truncation, echo), "median_steps_to_converge"]
    figure = Figure(figsize=(max(7.0, 0.42 * len(echo_steps) + 2.5), 2.0 * len(truncations) + 2.4),
                    layout="constrained")  # fmt: skip
    figure.suptitle(
        f"{title}: the truncation frontier\n"
        "dashed: echo step = truncation (at and right of it no gradient links input to target)"
    )
    top, bottom = figure.subplots(2, 1, sharex=True)
    maps = [
        (top, fraction, colormaps["viridis"], Normalize(0, 1), "fraction converged"),
        (bottom, median, colormaps["viridis_r"], _median_norm(median), "median steps to converge"),
    ]
    for ax, values, cmap, norm, label in maps:
        ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, origin="lower",
                  aspect="auto")  # fmt: skip
        for i, j in zip(*np.nonzero(np.isnan(values)), strict=True):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, **_NEVER))
        for i, truncation in enumerate(truncations):
            # The boundary sits between echo steps truncation - 1 and truncation.
            x = np.searchsorted(echo_steps, truncation) - 0.5
            ax.plot([x, x], [i - 0.5, i + 0.5], color="crimson", linestyle="--", linewidth=2)
        ax.set_yticks(range(len(truncations)), [str(t) for t in truncations])
        ax.set_ylabel("truncation")
        ax.set_title(label)
        bar = figure.colorbar(ScalarMappable(norm, cmap), ax=ax, label=label)
        if label.startswith("fraction"):
            bar.formatter = PercentFormatter(1.0)
    bottom.set_xticks(range(len(echo_steps)), [str(e) for e in echo_steps])
    bottom.set_xlabel("echo step")
    figure.legend(
        handles=[
            Line2D([], [], color="crimson", linestyle="--", label="echo step = truncation"),
            Patch(**_NEVER, label="fewer than half converged"),
        ],
        loc="outside lower center",
        ncols=2,
        fontsize="small",
    )
    return figure


def _median_norm(values: np.ndarray) -> Normalize:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return Normalize(0, 1)
    low, high = float(finite.min()), float(finite.max())
    return Normalize(low - 1, high + 1) if low == high else Normalize(low, high)


def capacity_frontier_figure(capacity: pd.DataFrame, truncation: int | None, title: str) -> Figure:
    """The largest echo step where a majority converged against state size, one line per depth
    (a hollow marker: no echo step had a majority, drawn at 0), with the truncation drawn (at
    and beyond it no gradient links an input to its target) and the line echo step = state
    size (one echo step per unit). `capacity` as capacity.capacity_table."""
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    figure.suptitle(f"{title}: the capacity frontier")
    ax = figure.subplots()
    sizes = sorted(capacity["state_size"].unique())
    for i, (layers, rows) in enumerate(capacity.groupby("num_layers", sort=True)):
        rows = rows.sort_values("state_size")
        reached = rows["largest_echo_step"].to_numpy(float)
        colour = colormaps["tab10"](i % 10)
        ax.plot(rows["state_size"], np.nan_to_num(reached), color=colour, linewidth=1.6,
                marker=_MARKERS[i % len(_MARKERS)], label=_legend(layers, "layer"))  # fmt: skip
        none = np.isnan(reached)
        ax.plot(rows["state_size"][none], np.zeros(none.sum()), linestyle="none", marker="o",
                markerfacecolor="white", markeredgecolor=colour)  # fmt: skip
    ax.plot(sizes, sizes, color="0.6", linestyle=":", label="echo step = state size")
    if truncation is not None:
        ax.axhline(truncation, color="crimson", linestyle="--", linewidth=1.5,
                   label=f"truncation ({truncation})")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{s:g}" for s in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    top = max(float(np.nanmax(capacity["largest_echo_step"].to_numpy(float), initial=0)), 1.0)
    ax.set_ylim(-0.5, max(top, truncation or 0) + 1)
    ax.set(xlabel="state size (units)", ylabel="largest echo step where most converged")
    ax.grid(color="0.92")
    ax.legend(fontsize="small")
    return figure
