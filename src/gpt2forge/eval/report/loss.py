"""The loss panel: train and val loss against the published val losses of the run's data, or the corpus's
unigram baseline on any other data."""

from __future__ import annotations

import math

import numpy as np

from .references import REFERENCES, applies
from .runs import Run, human
from .style import BASELINE_STYLE, REFERENCE_STYLES, RUN_STYLES, _hline, _legend, _mark_skipped, _noisy_curve, _points


def _baseline_lines(runs: list[Run]) -> list[tuple[float, str]]:
    """(value, legend label) of each distinct unigram baseline of the runs."""
    lines: list[tuple[float, str]] = []
    for run in runs:
        b = run.data.baseline if run.data else None
        if b is None or any(math.isclose(b["loss"], value) for value, _ in lines):
            continue
        whose = f" ({run.name})" if len(runs) > 1 else ""
        lines.append((b["loss"], f"corpus unigram baseline{whose}: {b['loss']:.3f} on {human(b['tokens'])} val tokens"))
    return lines


def _loss_limits(runs: list[Run], x: str, lines: list[float]) -> tuple[float, float]:
    """The y-range of the loss panel: every evaluation, baseline and reference inside it, unless the first steps'
    ~11 would squash the rest of the curve into a sliver (then they are cut, and labelled where they are)."""
    xs = np.concatenate([r[x][np.isfinite(r[c])] for r in runs for c in ("loss", "val_loss")])
    ys = np.concatenate([r[c][np.isfinite(r[c])] for r in runs for c in ("loss", "val_loss")])
    low = min([float(ys.min()), *lines])
    body = ys[xs >= xs.min() + 0.1 * (xs.max() - xs.min())]  # past the first tenth of the run
    body_top = max([float(np.percentile(body, 97)) if body.size else float(ys.max()), *lines])
    high = min(float(ys.max()), low + 5 * (body_top - low))  # the body keeps at least a fifth of the height
    high = max([high, *lines, low + 1e-3])
    pad = 0.05 * (high - low)
    return low - pad, high + pad


def _plot_loss(ax, runs: list[Run], x: str) -> list[str]:
    notes = []
    for run, style in zip(runs, RUN_STYLES):
        ok = np.isfinite(run["loss"])
        if ok.any():
            _noisy_curve(ax, run[x][ok], run["loss"][ok], f"{run.name} train", style["train"], style["linestyle"])
        ok = np.isfinite(run["val_loss"])
        if ok.any():
            _points(ax, run[x][ok], run["val_loss"][ok], f"{run.name} val", style["val"], style["linestyle"])
        else:
            notes.append(f"{run.name}: no validation loss in metrics.csv")
    ax.set_title("loss")
    ax.set_ylabel("loss (nats/token)")
    if not any(r.has("loss") or r.has("val_loss") for r in runs):
        ax.text(0.5, 0.5, "no loss values logged yet", transform=ax.transAxes, ha="center", color="#777777")
        return notes
    drawn = []
    refs = [r for r in REFERENCES if r.metric == "val_loss" and r.plot and any(applies(r, run) for run in runs)]
    for ref, style in zip(refs, REFERENCE_STYLES):
        _hline(ax, ref.value, f"{ref.plot}: {ref.value:g}", style)
        drawn.append(ref.value)
    for value, label in _baseline_lines(runs):
        _hline(ax, value, label, BASELINE_STYLE)
        drawn.append(value)
    _mark_skipped(ax, runs, x, label=False)
    low, high = _loss_limits(runs, x, drawn)
    ax.set_ylim(low, high)
    above: dict[float, list[tuple[int, float, str]]] = {}  # evaluations above the range, by x
    for run, style in zip(runs, RUN_STYLES):
        ok = np.isfinite(run["val_loss"]) & (run["val_loss"] > high)
        for at, value, step in zip(run[x][ok], run["val_loss"][ok], run["step"][ok]):
            above.setdefault(float(at), []).append((int(step), float(value), style["val"]))
    for at, points in above.items():  # an arrow at the top, with the value(s)
        values = " / ".join(dict.fromkeys(f"{value:.2f}" for _, value, _ in points))
        ax.annotate(f"step {points[0][0]}: {values} ↑", (at, 1), xycoords=("data", "axes fraction"), xytext=(5, -3),
                    textcoords="offset points", ha="left", va="top", fontsize=7.5, color=points[0][2],
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1}, zorder=5)
        for _, _, color in points:
            ax.plot([at], [1], marker="^", color=color, markersize=5, transform=ax.get_xaxis_transform(), clip_on=False)
    for run in runs:
        if run.data is None:
            notes.append(f"{run.name}: no config.toml beside metrics.csv, so its data is unknown: no reference val "
                         "loss and no unigram baseline drawn")
        elif run.data.family is None:
            notes.append(f"{run.name}: the published GPT-2 val losses (FineWeb-Edu, FineWeb) are not drawn: they "
                         f"do not apply to {run.data.description}"
                         + ("; the corpus's unigram baseline is drawn instead" if run.data.baseline else ""))
    _legend(ax, "upper right")
    return notes
