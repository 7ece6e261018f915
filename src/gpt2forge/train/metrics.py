"""Where training metrics go: the console, ``metrics.csv``, and the experiment trackers named in ``log.trackers``.

``metrics.csv`` has a fixed set of columns; a training step fills the train fields, an evaluation writes its
own row with the same step and only the eval fields. Any field may be empty. ``gpt2forge report`` reads it.
It is the source of truth; trackers (TensorBoard, W&B, MLflow, … through ``accelerate.tracking``, whose tracker
classes are used directly) get a copy of its numbers.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
import os
from pathlib import Path

from ..config import tracker_names
from ..errors import UserError
from ..runs import COLUMNS, format_duration


def truncate_metrics(path: Path, before_step: int) -> None:
    """Drop rows of steps ≥ ``before_step``: a resumed run redoes them, and must not leave duplicates behind."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("step", "").isdigit() and int(row["step"]) < before_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


# Tracker name -> (pip package, module to import): checked before a run starts, for a message naming the install.
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet_ml"), "aim": ("aim", "aim"), "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"), "swanlab": ("swanlab", "swanlab"), "trackio": ("trackio", "trackio"),
}
EXTRA_LOG = ("tensorboard", "wandb")  # in the package's [log] extra


def check_trackers(names: list[str]) -> None:
    """A UserError naming the pip install for every tracker whose package is missing."""
    missing = [n for n in names if importlib.util.find_spec(TRACKER_PACKAGES[n][1]) is None]
    if missing:
        packages = " ".join(TRACKER_PACKAGES[n][0] for n in missing)
        extra = " (or pip install 'gpt2forge[log]')" if set(missing) <= set(EXTRA_LOG) else ""
        verb = "is" if len(missing) == 1 else "are"
        raise UserError(f"log.trackers: {', '.join(missing)} {verb} not installed here: pip install {packages}{extra}")


def make_tracker(name: str, run_dir: Path, project: str, run_name: str, run_id: str = ""):
    """accelerate's tracker ``name`` for a run, started, used directly (the Accelerator is the trainer's).
    ``run_id``: the run's own id (``RUN_DIR/tracker_id``: new per run and per restart), kept apart from its name."""
    from accelerate import tracking
    from accelerate.state import PartialState

    if not PartialState._shared_state:  # no Accelerator in this process (a notebook, a test): accelerate's logging
        tracking.logger = logging.getLogger(tracking.__name__)  # adapter would refuse to log; a plain logger won't
    cls = tracking.LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":  # events in RUN_DIR/tensorboard, as `tensorboard --logdir out` expects
        tracker = cls("tensorboard", run_dir)
    elif name == "wandb":  # resumable: a resumed run continues the same W&B run, a restart starts a new one
        tracker = cls(project, name=run_name, id=run_id or None, resume="allow", dir=str(run_dir))
    elif name == "mlflow":
        tracker = cls(experiment_name=project, run_name=run_name)
    elif name == "aim":  # one Aim repository for the runs under out_dir, so they can be compared
        tracker = cls(run_name, run_dir.parent)
    elif name == "clearml":
        tracker = cls(project, task_name=run_name)
    elif name == "dvclive":
        tracker = cls(live=None, dir=str(run_dir / "dvclive"))
    elif name == "trackio":
        tracker = cls(project, name=run_name)
    elif name == "swanlab":
        tracker = cls(project, experiment_name=run_name)
    else:  # comet_ml, and what accelerate adds: its own convention (the project name first)
        tracker = cls(project, run_dir) if cls.requires_logging_directory else cls(project)
    tracker.main_process_only = False  # only the main rank makes a MetricsLogger; don't ask accelerate's state
    tracker.start()
    return tracker


def _flat(config: dict, prefix: str = "") -> dict:
    """A nested config as ``{"section.key": value}`` with the scalar types every tracker accepts (None left out)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif value is not None:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


class MetricsLogger:
    """Appends rows to metrics.csv (the record: never truncating an existing run's history) and mirrors their
    numbers to the experiment trackers named in ``trackers`` (accelerate's: tensorboard, wandb, mlflow, …)."""

    def __init__(self, run_dir: Path, *, trackers: str | list[str] | tuple[str, ...] = (), project: str = "gpt2forge",
                 run_name: str = "", run_id: str = "", config: dict | None = None) -> None:
        trackers = tracker_names(trackers) if isinstance(trackers, str) else list(trackers)  # "a,b" = log.trackers
        check_trackers(trackers)
        self.path = run_dir / "metrics.csv"
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            self.writer.writeheader()
        self.trackers = []
        try:
            for name in trackers:
                tracker = make_tracker(name, run_dir, project, run_name or run_dir.name, run_id)
                self.trackers.append(tracker)
                if config is not None:
                    tracker.store_init_configuration(_flat(config))
        except BaseException:
            self.close()
            raise

    def log(self, row: dict) -> None:
        self.writer.writerow({k: _format(v) for k, v in row.items()})
        self.file.flush()
        step = row["step"]
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(scalars, step=step)

    def close(self) -> None:
        self.file.close()
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def llmc_flops_per_token(model, seq_len: int) -> float:
    """llm.c's training FLOPs per token, 6N + 6·L·C·T with N every parameter (the position table and the vocabulary
    padding included): ~6% below our count (``flops_per_token``, nanoGPT's), so MFU compares with llm.c's figures."""
    c = model.config
    return 6 * model.num_params() + 6 * c.n_layer * c.n_embd * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: the FLOPs the model's arithmetic needs over the hardware's peak (None: no peak)."""
    return flops_per_token * tokens_per_s / peak_flops if peak_flops else None


def step_line(row: dict, max_steps: int, eta_s: float | None) -> str:
    """One console line per step: step, loss, lr, grad norm, time, throughput, MFU, ETA."""
    parts = [
        f"step {row['step']:>{len(str(max_steps))}}/{max_steps}",
        f"loss {row['loss']:.4f}",
        f"lr {row['lr']:.2e}",
        "norm -" if row["grad_norm"] is None else f"norm {row['grad_norm']:.3f}",  # None: grad_clip 0, not computed
        f"{row['step_ms']:.1f} ms",
        f"{row['tokens_per_s']:,.0f} tok/s",
    ]
    if row.get("mfu") is not None:
        parts.append(f"MFU {100 * row['mfu']:.1f}%" + (f" (llm.c {100 * row['mfu_llmc']:.1f}%)"
                                                        if row.get("mfu_llmc") is not None else ""))
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)
