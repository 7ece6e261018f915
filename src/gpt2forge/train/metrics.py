"""Where training metrics go: the console, ``metrics.csv``, and TensorBoard / W&B when asked.

``metrics.csv`` has a fixed set of columns; a training step fills the train fields, an evaluation writes its
own row with the same step and only the eval fields. Any field may be empty. ``gpt2forge report`` reads it.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

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


class MetricsLogger:
    """Appends rows to metrics.csv (never truncating an existing run's history) and mirrors them to
    TensorBoard and W&B when enabled."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = False, wandb: bool = False, wandb_project: str = "",
                 run_name: str = "", config: dict | None = None) -> None:
        self.path = run_dir / "metrics.csv"
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.file = open(self.path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            self.writer.writeheader()
        self.tb = self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("log.tensorboard needs the tensorboard package: pip install 'gpt2forge[log]'") from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise UserError("log.wandb needs the wandb package: pip install 'gpt2forge[log]'") from None
            self.wandb = wandb_lib.init(project=wandb_project, name=run_name, config=config, resume="allow",
                                        id=run_name or None, dir=str(run_dir))

    def log(self, row: dict) -> None:
        self.writer.writerow({k: _format(v) for k, v in row.items()})
        self.file.flush()
        step = row["step"]
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def step_line(row: dict, max_steps: int, eta_s: float | None) -> str:
    """One console line per step: step, loss, lr, grad norm, time, throughput, MFU, ETA."""
    parts = [
        f"step {row['step']:>{len(str(max_steps))}}/{max_steps}",
        f"loss {row['loss']:.4f}",
        f"lr {row['lr']:.2e}",
        f"norm {row['grad_norm']:.3f}",
        f"{row['step_ms']:.1f} ms",
        f"{row['tokens_per_s']:,.0f} tok/s",
    ]
    if row.get("mfu") is not None:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)
