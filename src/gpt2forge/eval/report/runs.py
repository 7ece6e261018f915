"""Reading a run for the report: its metrics.csv merged per step, the data it was trained on, and the numbers of
its summary table."""

from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...runs import COLUMNS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


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
    from ...data.manifest import read_manifest

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
        from ..baseline import unigram_loss

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
        "final_val_bpb": _last(run, "val_bpb"),
        "final_hellaswag": _last(run, "hellaswag_acc_norm"),
        "best_hellaswag": _best(run, "hellaswag_acc_norm", lowest=False),
        "final_core": _last(run, "core"),
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


def load_runs(run: str | os.PathLike, compare: str | os.PathLike | list | tuple | None = None) -> list[Run]:
    """The run, and the ones to compare with (one path or several), named apart where directories share a name."""
    from .style import RUN_STYLES

    compare = [] if compare is None else [compare] if isinstance(compare, (str, os.PathLike)) else list(compare)
    if 1 + len(compare) > len(RUN_STYLES):
        raise UserError(f"a report draws at most {len(RUN_STYLES)} runs (the run and {len(RUN_STYLES) - 1} "
                        f"--compare), got {1 + len(compare)}")
    runs = [load_run(run)] + [load_run(other) for other in compare]
    names = {runs[0].name}
    for i, other in enumerate(runs[1:], start=1):
        if other.name in names:
            other.name += " (compared)" if len(runs) == 2 else f" (compared {i})"
        names.add(other.name)
    return runs
