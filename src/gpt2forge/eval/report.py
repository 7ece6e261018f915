"""``gpt2forge report RUN_DIR``: a run's curves against the published numbers, as ``report.png`` and ``report.md``.

Reads ``RUN_DIR/metrics.csv`` as the trainer writes it: a row per logged step, evaluations in rows of their
own (same step, train fields empty). Rows of one step are merged field by field, the last non-empty value
winning, so eval rows join their step and a resumed run's re-logged steps replace the old ones.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..runs import COLUMNS, format_duration


@dataclass(frozen=True)
class Reference:
    metric: str  # "val_loss" or "hellaswag" (acc_norm)
    value: float
    what: str
    source: str
    approx: bool = False  # could not be checked against a file: always shown as approximate
    plot: str | None = None  # legend label when drawn as a line on the plots


# From REFERENCE.md (repository root): every number with where it was published.
REFERENCES = (
    Reference("val_loss", 3.2924, "OpenAI GPT-2 124M checkpoint, val loss on the FineWeb-Edu val shard",
              "build-nanogpt `play.ipynb`", plot="GPT-2 124M (OpenAI)"),
    Reference("val_loss", 3.07, "build-nanogpt run, 10B tokens of FineWeb-Edu, final val loss",
              "build-nanogpt video", approx=True),
    Reference("val_loss", 3.2722, "llm.c 124M, 10.26B tokens, final val loss (FineWeb val, not FineWeb-Edu)",
              "modded-nanogpt `records/track_1_short/2024-10-13_llmc`"),
    Reference("val_loss", 3.28, "modded-nanogpt speedrun target (FineWeb val)", "modded-nanogpt README"),
    Reference("hellaswag", 0.2955, "OpenAI GPT-2 124M, HellaSwag acc_norm (completion style, 10,042 val rows)",
              "build-nanogpt `hellaswag.py` docstring", plot="GPT-2 124M (OpenAI)"),
    Reference("hellaswag", 0.337, "GPT-3 124M (paper), HellaSwag", "build-nanogpt `play.ipynb`", plot="GPT-3 124M"),
    Reference("hellaswag", 0.4893, "OpenAI GPT-2 XL 1558M, HellaSwag acc_norm (same method)",
              "build-nanogpt `hellaswag.py` docstring"),
    Reference("hellaswag", 0.30, "build-nanogpt run, 10B tokens, HellaSwag acc_norm", "build-nanogpt video", approx=True),
)  # fmt: skip
CHANCE = 0.25  # HellaSwag has four endings


# --------------------------------------------------------------------------------------------- reading


@dataclass
class Run:
    """One run's metrics, a value per logged step (NaN where a step has none), sorted by step."""

    name: str
    metrics_path: Path
    columns: dict[str, np.ndarray]
    config_toml: str | None

    def __getitem__(self, column: str) -> np.ndarray:
        return self.columns[column]

    def has(self, column: str) -> bool:
        return bool(np.isfinite(self.columns[column]).any())


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None  # a half-written last line after a crash, say
    return value if value is not None and math.isfinite(value) else None


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """The columns of a metrics.csv, one entry per step (see the module docstring for how steps merge)."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise UserError(f"{path} is empty: the run has not logged a step yet")
            if "step" not in reader.fieldnames:
                raise UserError(f"{path} has no 'step' column: not a gpt2forge metrics.csv (columns: {', '.join(COLUMNS)})")
            steps: dict[int, dict[str, float]] = {}
            for row in reader:
                step = _number(row.get("step"))
                if step is None:
                    continue
                merged = steps.setdefault(int(step), {})
                for column in COLUMNS[1:]:
                    value = _number(row.get(column))
                    if value is not None:
                        merged[column] = value
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not steps:
        raise UserError(f"{path} has a header but no rows: the run has not logged a step yet")
    order = sorted(steps)
    columns = {"step": np.array(order, dtype=float)}
    for column in COLUMNS[1:]:
        columns[column] = np.array([steps[s].get(column, np.nan) for s in order])
    known = np.isfinite(columns["tokens"])
    if known.any() and not known.all():  # eval rows may lack tokens: tokens grow linearly with the step
        columns["tokens"] = np.interp(columns["step"], columns["step"][known], columns["tokens"][known])
    return columns


def load_run(path: str | os.PathLike) -> Run:
    """A run from its directory, or from a metrics.csv path (named after the directory holding it)."""
    path = Path(path)
    metrics = path if path.suffix == ".csv" else path / "metrics.csv"
    if not path.exists():
        raise UserError(f"{path} does not exist: pass a run directory (the trainer's out dir) or a metrics.csv")
    if not metrics.is_file():
        raise UserError(f"{path} has no metrics.csv: is it a run directory written by `gpt2forge train`?")
    config = metrics.parent / "config.toml"
    name = metrics.parent.resolve().name
    return Run(name, metrics, read_metrics(metrics), config.read_text() if config.is_file() else None)


# --------------------------------------------------------------------------------------------- numbers


def _last(run: Run, column: str) -> tuple[float, int] | None:
    values = run[column]
    finite = np.flatnonzero(np.isfinite(values))
    return (float(values[finite[-1]]), int(run["step"][finite[-1]])) if finite.size else None


def _best(run: Run, column: str, lowest: bool) -> tuple[float, int] | None:
    values = run[column]
    if not run.has(column):
        return None
    i = int(np.nanargmin(values) if lowest else np.nanargmax(values))
    return float(values[i]), int(run["step"][i])


def _steady_mean(run: Run, column: str) -> float | None:
    """Mean over logged steps, leaving out the first one (it pays for compilation and warm-up) when there are more."""
    values = run[column][np.isfinite(run[column])]
    if values.size > 1:
        values = values[1:]
    return float(values.mean()) if values.size else None


def summary(run: Run) -> dict:
    return {
        "steps": int(run["step"][-1]),
        "tokens": float(np.nanmax(run["tokens"])) if run.has("tokens") else None,
        "elapsed_s": float(np.nanmax(run["elapsed_s"])) if run.has("elapsed_s") else None,
        "final_loss": _last(run, "loss"),
        "final_val_loss": _last(run, "val_loss"),
        "best_val_loss": _best(run, "val_loss", lowest=True),
        "final_hellaswag": _last(run, "hellaswag_acc_norm"),
        "best_hellaswag": _best(run, "hellaswag_acc_norm", lowest=False),
        "tokens_per_s": _steady_mean(run, "tokens_per_s"),
        "mfu": _steady_mean(run, "mfu"),
    }


def human(n: float) -> str:
    """1234567 → 1.23M: token counts and rates at a glance."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


# --------------------------------------------------------------------------------------------- the plot

STYLES = ({"color": "#1f77b4"}, {"color": "#d62728"})  # this run, the compared run
REFERENCE_COLORS = ("#555555", "#2ca02c")


def _smooth(values: np.ndarray) -> np.ndarray:
    """Centred rolling median over ~1/30 of the points: shows the trend without lagging behind it, and ignores
    single slow steps (compilation, evaluation pauses)."""
    window = len(values) // 30
    if window < 3:
        return values
    before = window // 2
    padded = np.pad(values, (before, window - 1 - before), mode="reflect")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, window), axis=1)


def _empty(ax, text: str) -> None:
    """A panel with nothing to plot: its title and a note saying why."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#777777", fontsize=10)


def _hline(ax, value: float, label: str, color: str, linestyle: str = "--") -> None:
    """A horizontal reference line labelled in place (legends would cover the curves)."""
    ax.axhline(value, color=color, linestyle=linestyle, linewidth=1.1)
    ax.text(0.99, value, f" {label} ", transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=8,
            color=color, bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1})  # fmt: skip


def _reference_lines(ax, metric: str) -> None:
    drawn = [r for r in REFERENCES if r.metric == metric and r.plot]
    for ref, color in zip(drawn, REFERENCE_COLORS):
        _hline(ax, ref.value, f"{ref.plot}: {ref.value:g}", color)


def _plot_loss(ax, runs: list[Run], x: str) -> list[str]:
    notes = []
    for run, style in zip(runs, STYLES):
        ok = np.isfinite(run["loss"])
        if ok.any():
            xs, ys = run[x][ok], run["loss"][ok]
            ax.plot(xs, ys, alpha=0.2, linewidth=0.8, **style)
            ax.plot(xs, _smooth(ys), linewidth=1.4, label=f"{run.name} train", **style)
        ok = np.isfinite(run["val_loss"])
        if ok.any():
            ax.plot(run[x][ok], run["val_loss"][ok], "o-", markersize=3.5, linewidth=1.6, label=f"{run.name} val",
                    markeredgecolor="white", markeredgewidth=0.5, **style)  # fmt: skip
        else:
            notes.append(f"{run.name}: no validation loss in metrics.csv")
    values = np.concatenate([r[c][np.isfinite(r[c])] for r in runs for c in ("loss", "val_loss")])
    if not values.size:
        _empty(ax, "no loss values logged yet")
        return notes
    _reference_lines(ax, "val_loss")
    refs = [r.value for r in REFERENCES if r.metric == "val_loss" and r.plot]
    top = max(float(np.percentile(values, 97)), *refs) * 1.05  # the first steps' ~11 would flatten the rest
    ax.set_ylim(min(float(values.min()), *refs) - 0.1, top)
    ax.set_title("loss (train: light = raw, dark = smoothed)")
    ax.set_ylabel("cross-entropy")
    legend = ax.legend(fontsize=8, loc="upper right", title="\n".join(notes) or None, title_fontsize=8)
    legend.get_title().set_color("#777777")
    return notes


def _plot_hellaswag(ax, runs: list[Run], x: str) -> list[str]:
    notes = [f"{r.name}: no HellaSwag results in metrics.csv" for r in runs if not r.has("hellaswag_acc_norm")]
    if len(notes) == len(runs):
        _empty(ax, "no HellaSwag evaluations in metrics.csv\n(enable eval.hellaswag_every in the run config)")
        ax.set_title("HellaSwag acc_norm")
        return notes
    for run, style in zip(runs, STYLES):
        ok = np.isfinite(run["hellaswag_acc_norm"])
        if ok.any():
            ax.plot(run[x][ok], run["hellaswag_acc_norm"][ok], "o-", markersize=3.5, linewidth=1.6,
                    markeredgecolor="white", markeredgewidth=0.5, label=run.name, **style)  # fmt: skip
    _reference_lines(ax, "hellaswag")
    _hline(ax, CHANCE, f"chance: {CHANCE:g}", "#999999", linestyle=":")
    shown = [CHANCE, *(r.value for r in REFERENCES if r.metric == "hellaswag" and r.plot)]
    values = np.concatenate([r["hellaswag_acc_norm"][np.isfinite(r["hellaswag_acc_norm"])] for r in runs])
    ax.set_ylim(min(*shown, *values) - 0.01, max(*shown, *values) + 0.01)
    ax.set_title("HellaSwag acc_norm")
    ax.legend(fontsize=8, loc="upper left")
    return notes


def _plot_per_step(ax, runs: list[Run], column: str, title: str, scale: float, empty: str) -> None:
    ax.set_title(title)
    if not any(r.has(column) for r in runs):
        _empty(ax, empty)
        return
    for run, style in zip(runs, STYLES):
        ok = np.isfinite(run[column])
        steps, values = run["step"][ok], run[column][ok] * scale
        ax.plot(steps, values, alpha=0.25, linewidth=0.8, **style)
        ax.plot(steps, _smooth(values), linewidth=1.4, label=run.name, **style)
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="lower right")


def render_png(runs: list[Run], path: Path) -> list[str]:
    """Draw the four panels into ``path``; return notes on what could not be drawn."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    x = "tokens" if all(r.has("tokens") for r in runs) else "step"
    fig = Figure(figsize=(13, 8.5), dpi=110, layout="constrained")
    (loss_ax, swag_ax), (tps_ax, mfu_ax) = fig.subplots(2, 2)
    notes = _plot_loss(loss_ax, runs, x) + _plot_hellaswag(swag_ax, runs, x)
    for ax in (loss_ax, swag_ax):
        ax.set_xlabel("tokens seen" if x == "tokens" else "step")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
    _plot_per_step(tps_ax, runs, "tokens_per_s", "throughput (tokens/s)", 1.0, "no throughput logged")
    tps_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
    _plot_per_step(mfu_ax, runs, "mfu", "MFU (% of peak bf16 FLOP/s)", 100.0,
                   "MFU not logged\n(the device's peak FLOP/s is unknown, e.g. on CPU)")  # fmt: skip
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(" vs ".join(r.name for r in runs), fontsize=13)
    fig.savefig(path)
    return notes


# --------------------------------------------------------------------------------------------- markdown


def _cell(value, fmt) -> str:
    if value is None:
        return "–"
    if isinstance(value, tuple):
        return f"{fmt(value[0])} (step {value[1]:,})"
    return fmt(value)


def render_markdown(runs: list[Run], png_name: str, notes: list[str]) -> str:
    stats = [summary(r) for r in runs]
    four = "{:.4f}".format
    rows = [
        ("steps logged (last step)", "steps", lambda v: f"{v:,}"),
        ("tokens seen", "tokens", human),
        ("wall time", "elapsed_s", format_duration),
        ("final train loss", "final_loss", four),
        ("final val loss", "final_val_loss", four),
        ("best val loss", "best_val_loss", four),
        ("final HellaSwag acc_norm", "final_hellaswag", four),
        ("best HellaSwag acc_norm", "best_hellaswag", four),
        ("mean tokens/s (first step excluded)", "tokens_per_s", human),
        ("mean MFU (first step excluded)", "mfu", lambda v: f"{100 * v:.1f}%"),
    ]
    lines = [
        f"# Run report: {runs[0].name}",
        "",
        f"From `{runs[0].metrics_path}`" + (f", compared with `{runs[1].metrics_path}`" if len(runs) > 1 else "")
        + f"; generated {datetime.now(timezone.utc).isoformat(timespec='seconds')}.",
        "",
        f"![training curves]({png_name})",
        "",
        "| | " + " | ".join(r.name for r in runs) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    lines += [f"| {label} | " + " | ".join(_cell(s[key], fmt) for s in stats) + " |" for label, key, fmt in rows]
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    lines += [
        "",
        "## Reference numbers",
        "",
        "Val losses compare only on the same validation data (FineWeb-Edu val shard for the first row).",
        "",
        "| metric | value | what | source |",
        "|---|---:|---|---|",
    ]
    for ref in REFERENCES:
        value = f"~{ref.value:g} (approx.)" if ref.approx else f"{ref.value:g}"
        metric = "val loss" if ref.metric == "val_loss" else "HellaSwag"
        lines.append(f"| {metric} | {value} | {ref.what} | {ref.source} |")
    for run in runs:
        if run.config_toml:
            lines += ["", f"## Config of {run.name}", "", "```toml", run.config_toml.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_report(run: str | os.PathLike, compare: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.md`` beside the run's metrics.csv (``run`` is its directory or the file
    itself); ``compare`` overlays another run or metrics.csv."""
    runs = [load_run(run)] + ([load_run(compare)] if compare is not None else [])
    if len(runs) > 1 and runs[1].name == runs[0].name:
        runs[1].name += " (compared)"
    out_dir = runs[0].metrics_path.parent
    png, md = out_dir / "report.png", out_dir / "report.md"
    notes = render_png(runs, png)
    md.write_text(render_markdown(runs, png.name, notes))
    return png, md
