"""Figures, drawn with matplotlib's object API on the Agg canvas (no display, no global state)."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes, ready for an atomic write."""
    FigureCanvasAgg(figure)
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
