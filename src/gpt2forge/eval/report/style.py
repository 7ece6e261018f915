"""The report's look, shared by every panel: colours per run, fonts, sizes, and the drawing primitives (noisy
curves with their rolling median, evaluation points, reference lines, skipped-step markers, legends)."""

from __future__ import annotations

import numpy as np

from .runs import Run

# Per run (this one, then each compared one): a hue family, and a line style that tells them apart in grey too.
RUN_STYLES = (
    {"train": "#1f77b4", "val": "#ff7f0e", "linestyle": "-"},  # blue / orange
    {"train": "#2ca02c", "val": "#9467bd", "linestyle": "--"},  # green / purple
    {"train": "#17becf", "val": "#e377c2", "linestyle": "-."},  # cyan / pink
    {"train": "#bcbd22", "val": "#7f7f7f", "linestyle": ":"},  # olive / grey
)
REFERENCE_STYLES = ({"color": "#333333", "linestyle": (0, (5, 2))}, {"color": "#888888", "linestyle": (0, (2, 2))})
BASELINE_STYLE = {"color": "#8c564b", "linestyle": "-."}
SKIPPED_COLOR = "#d62728"
X_LABELS = {"tokens": "tokens seen", "step": "step"}
FONTS = {"font.size": 9, "axes.titlesize": 10.5, "axes.labelsize": 9.5, "xtick.labelsize": 8.5,
         "ytick.labelsize": 8.5, "legend.fontsize": 8, "figure.titlesize": 12}
PANEL_SIZE = (5.4, 3.5)  # inches: a 2-column grid is a page wide at 150 dpi
DPI = 150


def _smooth(values: np.ndarray) -> np.ndarray:
    """Centred rolling median over ~1/30 of the points: shows the trend without lagging behind it, and ignores
    single slow steps (compilation, evaluation pauses)."""
    window = len(values) // 30
    if window < 3:
        return values
    before = window // 2
    padded = np.pad(values, (before, window - 1 - before), mode="reflect")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, window), axis=1)


def _noisy_curve(ax, xs: np.ndarray, ys: np.ndarray, label: str, color: str, linestyle: str) -> None:
    """Raw values faint, their rolling median solid (just the values where there are too few to smooth)."""
    smooth = _smooth(ys)
    if smooth is not ys:
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.7, linestyle=linestyle)
        label += " (smoothed)"
    ax.plot(xs, smooth, color=color, linewidth=1.5, linestyle=linestyle, label=label)


def _points(ax, xs: np.ndarray, ys: np.ndarray, label: str, color: str, linestyle: str) -> None:
    """Evaluations: few, exact, marked."""
    ax.plot(xs, ys, marker="o", markersize=4.5, linewidth=1.5, linestyle=linestyle, color=color, label=label,
            markeredgecolor="white", markeredgewidth=0.6, zorder=3)


def _hline(ax, value: float, label: str, style: dict) -> None:
    ax.axhline(value, linewidth=1.2, label=label, zorder=1, **style)


def _mark_skipped(ax, runs: list[Run], x: str, label: bool) -> None:
    for run in runs:
        skipped = run["skipped"] > 0
        for i, at in enumerate(run[x][skipped]):
            ax.axvline(at, color=SKIPPED_COLOR, linewidth=0.9, linestyle=":", zorder=1,
                       label=f"skipped step (non-finite), {skipped.sum()} in {run.name}" if label and i == 0 else None)


def _legend(ax, loc: str = "best", ncol: int = 1) -> None:
    legend = ax.legend(loc=loc, ncol=ncol, framealpha=0.85)
    legend.get_frame().set_linewidth(0.5)
