"""The run directory, owned here: what its files are called and how to read them.

``out/<run>/`` holds ``config.toml`` (the resolved config), ``metrics.csv`` (one row per logged step and per
evaluation, columns ``COLUMNS``), ``train.log``, ``run.json`` (one record per launch: command, versions,
hardware), ``latest`` (the name of the newest complete checkpoint) and the checkpoints ``step-NNNNNN/``. A
checkpoint directory holds one file per stateful piece of the run (``train/checkpoint.py`` writes them) and a
``manifest.json`` with every file's size and sha256, written last: a checkpoint is complete exactly when its
manifest is there, and verified when its files still match it.

Training, evaluation, reports and weight loading all find their way through these functions, so the layout is
defined once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from .errors import UserError
from .files import atomic_write_json

LATEST = "latest"
MANIFEST = "manifest.json"
RUN_CONFIG = "config.toml"
METRICS = "metrics.csv"
RUN_RECORD = "run.json"
TRAIN_STATE = "train_state.json"
STEP_DIR = re.compile(r"^step-(\d{6,})$")
LEGACY_PIECES = ("model.safetensors", "optimizer.pt", "train_state.json", "rng.pt", "config.toml")  # before manifests
COLUMNS = (
    "step", "tokens", "elapsed_s", "loss", "lr", "grad_norm", "step_ms", "tokens_per_s", "mfu",
    "val_loss", "hellaswag_acc", "hellaswag_acc_norm",
)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_step(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def is_complete(path: Path) -> bool:
    """A ``step-N`` directory whose save finished (its manifest was written last; older ones: every piece)."""
    if not (path.is_dir() and STEP_DIR.match(path.name)):
        return False
    return (path / MANIFEST).is_file() or all((path / p).is_file() for p in LEGACY_PIECES)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, by step, oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if is_complete(p)), key=checkpoint_step)


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names when it is complete, else the complete one with the highest step."""
    latest = run_dir / LATEST
    if latest.is_file():
        named = run_dir / latest.read_text().strip()
        if is_complete(named):
            return named
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A run directory resolves to the checkpoint its ``latest`` pointer names; other paths are returned as is."""
    path = Path(path)
    latest = path / LATEST
    if latest.is_file():
        target = path / latest.read_text().strip()
        if not target.is_dir():
            raise UserError(f"{latest} points to {target.name}, which does not exist")
        return target
    return path


def file_digest(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(checkpoint: Path) -> None:
    """Record every file of a checkpoint directory with its size and sha256 (the last file a save writes)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(checkpoint.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write_json(checkpoint / MANIFEST, {"files": files})


def checkpoint_problems(checkpoint: Path, full: bool = True) -> list[str]:
    """What is wrong with a checkpoint against its manifest (missing/extra-size/hash mismatch), [] if intact.
    ``full=False`` checks sizes only (no reading)."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        if all((checkpoint / p).is_file() for p in LEGACY_PIECES):
            return []  # written before checkpoints had manifests: nothing to check against
        return [f"no {MANIFEST}: the save did not finish"]
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"unreadable {MANIFEST} ({e})"]
    problems = []
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{name} has {path.stat().st_size:,} bytes, the manifest says {expected['bytes']:,}")
        elif full and file_digest(path) != expected["sha256"]:
            problems.append(f"{name} does not match its sha256 (damaged)")
    return problems


def read_train_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / TRAIN_STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{checkpoint / TRAIN_STATE}: unreadable ({e})") from None


def training_position(checkpoint: Path | None) -> tuple[int | None, int | None]:
    """(step, tokens seen) of a checkpoint: from its train state, else the step from a ``step-N`` name."""
    if checkpoint is None:
        return None, None
    try:
        state = read_train_state(checkpoint)
        return int(state["step"]), int(state["tokens"]) if "tokens" in state else None
    except (UserError, ValueError, KeyError, TypeError):
        match = STEP_DIR.match(checkpoint.name)
        return (int(match.group(1)) if match else None), None


def append_launch(run_dir: Path, launch: dict) -> list[str]:
    """Add one launch to ``run.json`` (atomically); returns warnings (an unreadable record is started afresh)."""
    path, warnings = run_dir / RUN_RECORD, []
    record = {"launches": []}
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            warnings.append(f"{path} is unreadable; starting a new record of launches")
    record["launches"].append({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **launch})
    atomic_write_json(path, record)
    return warnings


def format_duration(seconds: float) -> str:
    """3725 → 1h02m: wall times and ETAs at a glance."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
