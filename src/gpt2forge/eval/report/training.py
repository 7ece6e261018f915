"""The panels of the optimisation itself: learning rate, gradient norm (with the clipping threshold), throughput
and MFU."""

from __future__ import annotations

import numpy as np

from .runs import Run
from .style import RUN_STYLES, _hline, _legend, _mark_skipped, _noisy_curve


def _plot_lr(ax, runs: list[Run], x: str) -> None:
    for run, style in zip(runs, RUN_STYLES):
        ok = np.isfinite(run["lr"])
        ax.plot(run[x][ok], run["lr"][ok], color=style["train"], linestyle=style["linestyle"], linewidth=1.5,
                label=run.name)
    ax.set_title("learning rate schedule")
    ax.set_ylabel("learning rate")
    ax.set_ylim(bottom=0)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=True)
    if len(runs) > 1:
        _legend(ax)


def _plot_grad_norm(ax, runs: list[Run], x: str) -> None:
    values = []
    for run, style in zip(runs, RUN_STYLES):
        ok = np.isfinite(run["grad_norm"])
        _noisy_curve(ax, run[x][ok], run["grad_norm"][ok], run.name, style["train"], style["linestyle"])
        values.append(run["grad_norm"][ok])
    clips = {float(r.config.get("optim", {}).get("grad_clip", 0) or 0) for r in runs} - {0.0}
    for clip in sorted(clips):
        _hline(ax, clip, f"clipping threshold: {clip:g}", {"color": "#777777", "linestyle": (0, (4, 2))})
    values = np.concatenate(values)
    positive = values[values > 0]
    if positive.size and positive.max() / positive.min() > 30:  # spikes and the early decay: log shows both
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(bottom=0)
    _mark_skipped(ax, runs, x, label=True)
    ax.set_title("gradient norm")
    ax.set_ylabel("global L2 norm, before clipping")
    if len(runs) > 1 or clips or any(len(r.skipped) for r in runs):
        _legend(ax, "upper right")


def _plot_rate(ax, runs: list[Run], x: str, column: str, scale: float) -> None:
    for run, style in zip(runs, RUN_STYLES):
        ok = np.isfinite(run[column])
        _noisy_curve(ax, run[x][ok], run[column][ok] * scale, run.name, style["train"], style["linestyle"])
    ax.set_ylim(bottom=0)
    if len(runs) > 1:
        _legend(ax, "lower right")
