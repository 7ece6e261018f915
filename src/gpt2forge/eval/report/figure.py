"""The report's figure: which panels a set of runs has data for, their grid, one x axis for all, the title and
the footnotes on what could not be drawn."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from ...errors import UserError
from .evals import _plot_core, _plot_hellaswag
from .loss import _plot_loss
from .runs import Run, human
from .style import DPI, FONTS, PANEL_SIZE, X_LABELS
from .training import _plot_grad_norm, _plot_lr, _plot_rate


def panels(runs: list[Run]) -> list[str]:
    """The panels the runs have data for, in order."""
    def logged(column: str) -> bool:
        return any(r.has(column) for r in runs)

    chosen = ["loss"]
    chosen += ["hellaswag"] if logged("hellaswag_acc_norm") else []
    chosen += ["core"] if logged("core") else []
    chosen += ["lr"] if logged("lr") else []
    chosen += ["grad_norm"] if logged("grad_norm") else []
    chosen += ["throughput"] if logged("tokens_per_s") else []
    chosen += ["mfu"] if logged("mfu") else []
    return chosen


def _grid(fig, count: int) -> list:
    """``count`` axes in a grid with no empty cell: the loss panel (first) widens over the spare columns."""
    columns = 1 if count == 1 else 2 if count <= 4 else 3
    rows = math.ceil(count / columns)
    spare = rows * columns - count
    grid = fig.add_gridspec(rows, columns)
    axes = [fig.add_subplot(grid[0, : 1 + spare])]
    cells = [(r, c) for r in range(rows) for c in range(columns)][1 + spare :]
    axes += [fig.add_subplot(grid[r, c]) for r, c in cells]
    return axes


def _data_line(runs: list[Run]) -> str:
    described = [r.data.description if r.data else "unknown (no config.toml)" for r in runs]
    if len(set(described)) == 1:
        return f"data: {described[0]}"
    return "data: " + "; ".join(f"{r.name}: {d}" for r, d in zip(runs, described))


def pick_x(runs: list[Run], x: str | None) -> str:
    if x is None:
        return "tokens" if all(r.has("tokens") for r in runs) else "step"
    if x not in X_LABELS:
        raise UserError(f"x must be one of {', '.join(X_LABELS)}, got {x!r}")
    if x == "tokens" and not all(r.has("tokens") for r in runs):
        raise UserError("a metrics.csv has no token counts: plot against the step instead (--x step)")
    return x


def build_figure(runs: list[Run], x: str | None = None):
    """The report's figure (a matplotlib ``Figure``) and the notes on what it could not show."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    x = pick_x(runs, x)
    chosen = panels(runs)
    with matplotlib.rc_context(FONTS):
        columns = 1 if len(chosen) == 1 else 2 if len(chosen) <= 4 else 3
        rows = math.ceil(len(chosen) / columns)
        fig = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows + 0.9), dpi=DPI, layout="constrained")
        notes: list[str] = []
        left, right = min(float(np.nanmin(r[x])) for r in runs), max(float(np.nanmax(r[x])) for r in runs)
        pad = 0.03 * (right - left) or 0.5
        for name, ax in zip(chosen, _grid(fig, len(chosen))):
            if name == "loss":
                notes += _plot_loss(ax, runs, x)
            elif name == "hellaswag":
                notes += _plot_hellaswag(ax, runs, x)
            elif name == "core":
                notes += _plot_core(ax, runs, x)
            elif name == "lr":
                _plot_lr(ax, runs, x)
            elif name == "grad_norm":
                _plot_grad_norm(ax, runs, x)
            elif name == "throughput":
                _plot_rate(ax, runs, x, "tokens_per_s", 1.0)
                ax.set_title("throughput")
                ax.set_ylabel("tokens/s")
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
            elif name == "mfu":
                _plot_rate(ax, runs, x, "mfu", 100.0)
                ax.set_title("model FLOPs utilization")
                ax.set_ylabel("MFU (% of peak bf16 FLOP/s)")
            ax.set_xlabel(X_LABELS[x])
            if x == "tokens":
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
            ax.set_xlim(left - pad, right + pad)  # one x range for all; the step-0 marker wholly inside the axes
            ax.grid(alpha=0.3, linewidth=0.6)
            ax.spines[["top", "right"]].set_visible(False)
        for run in runs:
            notes += run.data.notes if run.data else []
        fig.suptitle(" vs ".join(r.name for r in runs) + "\n" + _data_line(runs))
        if notes:
            width = int(fig.get_figwidth() * 16)  # characters of 7.5-point text per line
            text = "\n".join(textwrap.fill(note, width, subsequent_indent="  ") for note in dict.fromkeys(notes))
            fig.supxlabel(text, x=0.005, ha="left", fontsize=7.5, color="#555555")
    return fig, notes


def render_png(runs: list[Run], path: Path, x: str | None = None) -> list[str]:
    """Draw the panels the runs have into ``path``; return notes on what could not be drawn."""
    import matplotlib

    fig, notes = build_figure(runs, x)
    with matplotlib.rc_context(FONTS):
        fig.savefig(path, dpi=DPI)
    return notes
