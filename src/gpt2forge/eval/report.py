"""``gpt2forge report RUN_DIR``: a run's curves, against the numbers that apply to its data, as ``report.png``
and ``report.md``.

Reads ``RUN_DIR/metrics.csv`` as the trainer writes it: a row per logged step, evaluations in rows of their
own (same step, train fields empty). Rows of one step are merged field by field, the last non-empty value
winning, so eval rows join their step and a resumed run's re-logged steps replace the old ones. A step whose
loss or gradient norm was logged as non-finite was skipped by the trainer; the plots mark it.

**What is drawn.** A panel per thing the run logged, nothing else: loss (train and val), HellaSwag, learning
rate, gradient norm, throughput, MFU (GPUs only). **Against what.** The run's ``config.toml`` names its data
directory (``[data] dir``), whose ``manifest.json`` says where the text came from. Published val losses
(``REFERENCES``) are drawn only over runs on the data they were measured on (FineWeb-Edu, or FineWeb for the
llm.c/speedrun numbers); a directory without a manifest (llm.c's shards) is judged by its name. On any other
data the reference is the corpus's own unigram baseline (``eval.baseline``), measured on the run's val tokens.
HellaSwag references and chance apply to every run that logged HellaSwag.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import textwrap
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..runs import COLUMNS, format_duration

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Reference:
    metric: str  # "val_loss" or "hellaswag" (acc_norm)
    value: float
    what: str
    source: str
    approx: bool = False  # could not be checked against a file: always shown as approximate
    plot: str | None = None  # legend label when drawn as a line on the plots
    data: str | None = None  # "fineweb-edu" / "fineweb": only runs on that data compare; None: any run


# From REFERENCE.md (repository root): every number with where it was published.
REFERENCES = (
    Reference("val_loss", 3.2924, "OpenAI GPT-2 124M checkpoint, val loss on the FineWeb-Edu val shard",
              "build-nanogpt `play.ipynb`", plot="GPT-2 124M (OpenAI), FineWeb-Edu val", data="fineweb-edu"),
    Reference("val_loss", 3.07, "build-nanogpt run, 10B tokens of FineWeb-Edu, final val loss",
              "build-nanogpt video", approx=True, data="fineweb-edu"),
    Reference("val_loss", 3.2722, "llm.c 124M, 10.26B tokens, final val loss (FineWeb val, not FineWeb-Edu)",
              "modded-nanogpt `records/track_1_short/2024-10-13_llmc`", data="fineweb"),
    Reference("val_loss", 3.28, "modded-nanogpt speedrun target (FineWeb val)", "modded-nanogpt README",
              plot="speedrun target (GPT-2 124M level), FineWeb val", data="fineweb"),
    Reference("hellaswag", 0.2955, "OpenAI GPT-2 124M, HellaSwag acc_norm (completion style, 10,042 val rows)",
              "build-nanogpt `hellaswag.py` docstring", plot="GPT-2 124M (OpenAI)"),
    Reference("hellaswag", 0.337, "GPT-3 124M (paper), HellaSwag", "build-nanogpt `play.ipynb`", plot="GPT-3 124M"),
    Reference("hellaswag", 0.4893, "OpenAI GPT-2 XL 1558M, HellaSwag acc_norm (same method)",
              "build-nanogpt `hellaswag.py` docstring"),
    Reference("hellaswag", 0.30, "build-nanogpt run, 10B tokens, HellaSwag acc_norm", "build-nanogpt video",
              approx=True),
)
CHANCE = 0.25  # HellaSwag has four endings
HELLASWAG_ROWS = 10042
FAMILY_NAMES = {"fineweb-edu": "FineWeb-Edu", "fineweb": "FineWeb"}


# --------------------------------------------------------------------------------------------- reading


@dataclass
class DataInfo:
    """What a run was trained on, as far as its config and the data directory's manifest tell."""

    dir: str | None  # [data] dir of the run's config.toml, as written there
    description: str  # in words, for titles and tables
    family: str | None  # "fineweb-edu" / "fineweb": the published val losses of that data apply; None: none do
    basis: str  # how ``family`` was decided
    seq_len: int | None = None
    val_tokens: int | None = None  # as the config says: 0 = the whole val split
    baseline: dict | None = None  # eval.baseline.unigram_loss's result, where computed
    notes: list[str] = field(default_factory=list)


@dataclass
class Run:
    """One run's metrics, a value per logged step (NaN where a step has none), sorted by step."""

    name: str
    metrics_path: Path
    columns: dict[str, np.ndarray]
    config_toml: str | None
    data: DataInfo | None = None

    def __getitem__(self, column: str) -> np.ndarray:
        return self.columns[column]

    def has(self, column: str) -> bool:
        return bool(np.isfinite(self.columns[column]).any())

    @property
    def config(self) -> dict:
        """The run's config.toml as a dict ({} where it is missing or unreadable)."""
        try:
            return tomllib.loads(self.config_toml) if self.config_toml else {}
        except tomllib.TOMLDecodeError:
            return {}

    @property
    def skipped(self) -> np.ndarray:
        """Steps the trainer skipped: loss or gradient norm logged as non-finite."""
        return self.columns["step"][self.columns["skipped"] > 0]


def _parse(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None  # a half-written last line after a crash, say


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """The columns of a metrics.csv, one entry per step (see the module docstring for how steps merge), and
    ``skipped``: 1 where the step's loss or gradient norm is non-finite, else 0."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise UserError(f"{path} is empty: the run has not logged a step yet")
            if "step" not in reader.fieldnames:
                raise UserError(f"{path} has no 'step' column: not a gpt2forge metrics.csv "
                                f"(columns: {', '.join(COLUMNS)})")
            steps: dict[int, dict[str, float]] = {}
            for row in reader:
                step = _parse(row.get("step"))
                if step is None or not math.isfinite(step):
                    continue
                merged = steps.setdefault(int(step), {})
                for column in COLUMNS[1:]:
                    value = _parse(row.get(column))
                    if value is not None:
                        merged[column] = value
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not steps:
        raise UserError(f"{path} has a header but no rows: the run has not logged a step yet")
    order = sorted(steps)
    columns = {"step": np.array(order, dtype=float)}
    for column in COLUMNS[1:]:
        values = np.array([steps[s].get(column, np.nan) for s in order])
        columns[column] = np.where(np.isfinite(values), values, np.nan)
    columns["skipped"] = np.array(
        [any(c in steps[s] and not math.isfinite(steps[s][c]) for c in ("loss", "grad_norm")) for s in order],
        dtype=float,
    )
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


# --------------------------------------------------------------------------------------------- the run's data


def data_family(name: str) -> str | None:
    """"fineweb-edu", "fineweb" or None, from a dataset name, file path or directory name
    (``HuggingFaceFW/fineweb-edu``, build-nanogpt's ``edu_fineweb10B``, llm.c's ``fineweb10B``)."""
    words = name.lower().replace("_", "-")
    if "fineweb-edu" in words or "edu-fineweb" in words:
        return "fineweb-edu"
    return "fineweb" if "fineweb" in words else None


def describe_source(source: dict) -> tuple[str, str | None]:
    """The source of a prepare manifest in words, and its data family (``data_family``)."""
    kind = source.get("kind")
    if kind == "hub":
        name = source.get("dataset", "?")
        detail = ", ".join(str(source[k]) for k in ("config", "split") if source.get(k))
        return (f"{name} ({detail})" if detail else name), data_family(name)
    if kind == "files":
        paths = [f.get("path", "?") for f in source.get("files", [])]
        shown = ", ".join(Path(p).name for p in paths[:2]) + (f" (+{len(paths) - 2} more)" if len(paths) > 2 else "")
        families = {data_family(p) for p in paths}
        return f"local files: {shown}", families.pop() if len(families) == 1 else None  # all from one dataset
    if kind == "embedded":
        return (f"the embedded corpus (Python {source.get('python', '?')} standard library, "
                f"{source.get('documents', '?')} documents)"), None
    return f"unknown source kind {kind!r}", None


def run_data(run: Run, baseline: bool = True) -> DataInfo | None:
    """The run's data as its config and the data directory tell; with ``baseline``, the corpus's unigram baseline
    on the run's val tokens wherever no published reference applies and the data can be read."""
    from ..data.shards import read_manifest

    if run.config_toml is None:
        return None
    config = run.config
    if not config:
        return DataInfo(None, "unknown (config.toml does not parse)", None, "config.toml unreadable")
    directory = config.get("data", {}).get("dir")
    if not directory:
        return DataInfo(None, "unknown (config.toml has no [data] dir)", None, "no [data] dir in config.toml")
    info = DataInfo(directory, Path(directory).name, data_family(Path(directory).name), "the directory's name",
                    seq_len=config.get("train", {}).get("seq_len", 1024),
                    val_tokens=config.get("eval", {}).get("val_tokens", 1310720))
    path = Path(directory)
    if not path.is_dir():
        info.description += " (not found)"
        info.notes.append(f"{run.name}: data directory {directory} not found"
                          + (" (relative to the current directory)" if not path.is_absolute() else "")
                          + ": which data the run saw is judged by the directory's name; no unigram baseline")
        return info
    try:
        manifest = read_manifest(path)
    except UserError as e:
        manifest = None
        info.notes.append(f"{run.name}: {e}")
    if manifest and isinstance(manifest.get("settings", {}).get("source"), dict):
        info.description, info.family = describe_source(manifest["settings"]["source"])
        info.basis = "the manifest's source"
    else:
        info.description += " (no manifest.json)"
    if baseline and info.family is None:
        from .baseline import unigram_loss

        try:
            vocab_size = config.get("model", {}).get("vocab_size", 50257)
            info.baseline = unigram_loss(path, info.seq_len, info.val_tokens, vocab_size)
        except UserError as e:
            info.notes.append(f"{run.name}: no unigram baseline ({e})")
        else:
            if info.baseline["capped"]:
                counted, total = (human(info.baseline[k]) for k in ("train_tokens_counted", "train_tokens_total"))
                info.notes.append(f"{run.name}: unigram frequencies from the first {counted} of {total} train tokens")
    return info


def applies(ref: Reference, run: Run) -> bool:
    """Whether a published number compares with this run: same data for val losses, any run that logged HellaSwag
    for HellaSwag."""
    if ref.metric == "hellaswag":
        return run.has("hellaswag_acc_norm")
    return ref.data is not None and run.data is not None and run.data.family == ref.data


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
        "skipped_steps": len(run.skipped),
    }


def human(n: float) -> str:
    """1234567 → 1.23M: token counts and rates at a glance."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


# --------------------------------------------------------------------------------------------- the plot

# Per run (this one, the compared one): a hue family, and a line style that tells them apart in grey too.
RUN_STYLES = (
    {"train": "#1f77b4", "val": "#ff7f0e", "linestyle": "-"},  # blue / orange
    {"train": "#2ca02c", "val": "#9467bd", "linestyle": "--"},  # green / purple
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


def panels(runs: list[Run]) -> list[str]:
    """The panels the runs have data for, in order."""
    def logged(column: str) -> bool:
        return any(r.has(column) for r in runs)

    chosen = ["loss"]
    chosen += ["hellaswag"] if logged("hellaswag_acc_norm") else []
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


# --------------------------------------------------------------------------------------------- markdown


def _cell(value, fmt) -> str:
    if value is None:
        return "–"
    if isinstance(value, tuple):
        return f"{fmt(value[0])} (step {value[1]:,})"
    return fmt(value)


def _baseline_cell(run: Run) -> str:
    if run.data is None:
        return "– (data unknown)"
    b = run.data.baseline
    if b is None:
        if run.data.family:
            return f"– (not computed: published {FAMILY_NAMES[run.data.family]} references apply)"
        return "– (data not readable)"
    counted = f", frequencies from the first {human(b['train_tokens_counted'])} train tokens" if b["capped"] else ""
    return f"{b['loss']:.4f} on {human(b['tokens'])} val tokens{counted}"


def _data_cell(run: Run) -> str:
    if run.data is None:
        return "unknown (no config.toml)"
    d = run.data
    if d.dir is None:
        return d.description
    verdict = FAMILY_NAMES[d.family] if d.family else "other data: no published val loss applies"
    return f"`{d.dir}`: {d.description} → {verdict} (judged by {d.basis})"


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
        ("skipped steps (non-finite loss or grad norm)", "skipped_steps", str),
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
        "| data | " + " | ".join(_data_cell(r) for r in runs) + " |",
    ]
    lines += [f"| {label} | " + " | ".join(_cell(s[key], fmt) for s in stats) + " |" for label, key, fmt in rows]
    lines.append("| unigram baseline (val loss of train-split token frequencies) | "
                 + " | ".join(_baseline_cell(r) for r in runs) + " |")
    absent = {"val_loss": "validation loss", "hellaswag_acc_norm": "HellaSwag", "lr": "learning rate",
              "grad_norm": "gradient norm", "tokens_per_s": "throughput", "mfu": "MFU (needs a GPU's peak FLOP/s)"}
    for run in runs:
        missing = [what for column, what in absent.items() if not run.has(column)]
        if missing:
            notes = [*notes, f"{run.name}: not logged, so not plotted: {', '.join(missing)}"]
    if notes:
        lines += ["", *[f"- {note}" for note in dict.fromkeys(notes)]]
    lines += [
        "",
        "## Reference numbers",
        "",
        ("Val losses compare only on the same data: a reference applies to a run on the data it was measured on. "
         "The unigram baseline scores the same val tokens as the run's val loss; a model that learned anything "
         "about context beats it."),
        "",
        "| metric | value | what | source | applies to |",
        "|---|---:|---|---|---|",
    ]
    for ref in REFERENCES:
        value = f"~{ref.value:g} (approx.)" if ref.approx else f"{ref.value:g}"
        metric = "val loss" if ref.metric == "val_loss" else "HellaSwag"
        which = [r.name for r in runs if applies(ref, r)]
        lines.append(f"| {metric} | {value} | {ref.what} | {ref.source} | {', '.join(which) or 'not these runs'} |")
    for run in runs:
        if run.config_toml:
            lines += ["", f"## Config of {run.name}", "", "```toml", run.config_toml.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def load_runs(run: str | os.PathLike, compare: str | os.PathLike | None = None) -> list[Run]:
    """The run, and the one to compare with (named apart where both directories have the same name)."""
    runs = [load_run(run)] + ([load_run(compare)] if compare is not None else [])
    if len(runs) > 1 and runs[1].name == runs[0].name:
        runs[1].name += " (compared)"
    return runs


def write_report(
    run: str | os.PathLike, compare: str | os.PathLike | None = None, *, x: str | None = None
) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.md`` beside the run's metrics.csv (``run`` is its directory or the file
    itself); ``compare`` overlays another run or metrics.csv; ``x`` is "tokens" (the default where logged) or
    "step"."""
    runs = load_runs(run, compare)
    pick_x(runs, x)  # a bad choice fails before the data is read
    for r in runs:
        r.data = run_data(r)
    out_dir = runs[0].metrics_path.parent
    png, md = out_dir / "report.png", out_dir / "report.md"
    notes = render_png(runs, png, x)
    md.write_text(render_markdown(runs, png.name, notes))
    return png, md
