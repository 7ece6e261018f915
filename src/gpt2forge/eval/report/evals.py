"""The evaluation panels: HellaSwag accuracy and the downstream suite's CORE-style score per evaluation, against
the published references and chance."""

from __future__ import annotations

import numpy as np

from .references import CHANCE, HELLASWAG_ROWS, REFERENCES
from .runs import Run
from .style import REFERENCE_STYLES, RUN_STYLES, _hline, _legend, _points


def _plot_hellaswag(ax, runs: list[Run], x: str) -> list[str]:
    """acc_norm per evaluation, with ±1 binomial standard error bars (a 200-example subset is noisy: ±0.03)."""
    notes = []
    limits = set()
    for run, style in zip(runs, RUN_STYLES):
        ok = np.isfinite(run["hellaswag_acc_norm"])
        if not ok.any():
            notes.append(f"{run.name}: no HellaSwag results in metrics.csv")
            continue
        limit = int(run.config.get("eval", {}).get("hellaswag_limit", 0) or 0)
        limits.add(limit)
        xs, ys = run[x][ok], run["hellaswag_acc_norm"][ok]
        error = np.sqrt(ys * (1 - ys) / (limit or HELLASWAG_ROWS))
        ax.errorbar(xs, ys, yerr=error, fmt="none", ecolor=style["train"], elinewidth=0.9, capsize=2.5, alpha=0.6)
        _points(ax, xs, ys, run.name, style["train"], style["linestyle"])
    refs = [r for r in REFERENCES if r.metric == "hellaswag" and r.plot]
    for ref, style in zip(refs, REFERENCE_STYLES):
        _hline(ax, ref.value, f"{ref.plot}: {ref.value:g}", style)
    _hline(ax, CHANCE, f"chance: {CHANCE:g}", {"color": "#aaaaaa", "linestyle": ":"})
    low, high = ax.dataLim.intervaly  # points with their error bars, and the lines
    low, high = min(low, CHANCE, *(r.value for r in refs)), max(high, *(r.value for r in refs))
    ax.set_ylim(low - 0.05 * (high - low), high + 0.3 * (high - low))  # headroom: the legend sits above the lines
    subset = sorted(limits - {0})
    if subset:
        ax.set_title(f"HellaSwag acc_norm (first {subset[0]:,} of {HELLASWAG_ROWS:,} examples)")
        notes.append(f"HellaSwag on the first {subset[0]:,} examples (eval.hellaswag_limit), the references on all "
                     f"{HELLASWAG_ROWS:,}; error bars: ±1 binomial standard error")
    else:
        ax.set_title("HellaSwag acc_norm")
    ax.set_ylabel("accuracy (length-normalized)")
    _legend(ax, "upper left", ncol=2)
    return notes


def _plot_core(ax, runs: list[Run], x: str) -> list[str]:
    """The downstream suite's CORE-style score (mean centered accuracy: 0 = chance, 1 = perfect) per evaluation."""
    notes = []
    for run, style in zip(runs, RUN_STYLES):
        ok = np.isfinite(run["core"])
        if not ok.any():
            notes.append(f"{run.name}: no downstream-suite results in metrics.csv")
            continue
        _points(ax, run[x][ok], run["core"][ok], run.name, style["train"], style["linestyle"])
    refs = [r for r in REFERENCES if r.metric == "core" and r.plot]
    for ref, style in zip(refs, REFERENCE_STYLES):
        _hline(ax, ref.value, f"{ref.plot}: {ref.value:g}", style)
    _hline(ax, 0.0, "chance: 0", {"color": "#aaaaaa", "linestyle": ":"})
    low, high = ax.dataLim.intervaly
    ax.set_ylim(low - 0.05 * (high - low), high + 0.3 * (high - low))
    ax.set_title("downstream suite (CORE-style mean)")
    ax.set_ylabel("mean centered accuracy")
    _legend(ax, "upper left")
    notes.append("the downstream panel averages our zero-shot tasks (eval.tasks); DCLM's CORE, the reference line, "
                 "averages 22 few-shot tasks: the same scale, not the same score")
    return notes
