"""Training checkpoints: named pieces, written atomically, the newest K kept.

``RUN_DIR/step-000123/`` holds

- ``model.safetensors``: the weights, with the model config in the metadata (loads on its own for sampling),
- ``optimizer.pt``: the AdamW state (tensors and numbers only: loads with ``weights_only=True``),
- ``train_state.json``: step, tokens seen, loader position, world size, elapsed time,
- ``rng.pt``: the torch RNG states of every rank,
- ``config.toml``: the resolved run config,
- ``training_eval.json``: the validation loss / HellaSwag results of this step, when an evaluation fell on it
  (``gpt2forge eval`` writes its own ``eval.json`` beside it).

The directory is written as ``step-000123.tmp``, every file fsynced, then renamed: a directory without the
suffix is complete by construction, and a crash mid-save leaves the previous checkpoint untouched. The run
directory's ``latest`` file is then replaced atomically, and only after that are old checkpoints pruned.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_write_text, fsync_dir
from ..model import GPTConfig
from ..weights import LATEST, MODEL_FILE, save_weights

STEP_DIR = re.compile(r"^step-(\d{6,})$")
PIECES = (MODEL_FILE, "optimizer.pt", "train_state.json", "rng.pt", "config.toml")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_step(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def is_complete(path: Path) -> bool:
    return path.is_dir() and STEP_DIR.match(path.name) is not None and all((path / p).is_file() for p in PIECES)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, by step, oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if is_complete(p)), key=checkpoint_step)


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(directory)


@dataclass
class Checkpoint:
    """The pieces of a training checkpoint, in memory."""

    model_state: dict  # full (unsharded) state dict of the GPT
    model_config: GPTConfig
    optimizer_state: dict
    train_state: dict
    rng_states: list[dict]
    config_toml: str
    evals: dict | None = None  # validation / HellaSwag results at this step, saved as training_eval.json


def save_checkpoint(run_dir: Path, step: int, ckpt: Checkpoint, keep_last: int) -> Path:
    """Write ``ckpt`` as ``run_dir/step-NNNNNN`` atomically, point ``latest`` at it, prune beyond ``keep_last``."""
    final = run_dir / step_dir_name(step)
    tmp = run_dir / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(ckpt.model_state, ckpt.model_config, tmp)
    torch.save(ckpt.optimizer_state, tmp / "optimizer.pt")
    torch.save({"ranks": ckpt.rng_states}, tmp / "rng.pt")
    (tmp / "train_state.json").write_text(json.dumps(ckpt.train_state, indent=2) + "\n")
    (tmp / "config.toml").write_text(ckpt.config_toml)
    if ckpt.evals:
        (tmp / "training_eval.json").write_text(json.dumps(ckpt.evals, indent=2) + "\n")
    _fsync_tree(tmp)
    replaced = None
    if final.exists():  # re-saving a step (a stop signal right after a periodic save): keep the old one until done
        replaced = final.with_name(final.name + ".old")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(tmp, final)
    fsync_dir(run_dir)
    atomic_write_text(run_dir / LATEST, final.name + "\n")
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(run_dir: Path) -> None:
    """Finish what a crash during a save left: delete half-written ``step-*.tmp`` directories, and put back a
    checkpoint that was being replaced (``step-*.old``) if its replacement never arrived."""
    if not run_dir.is_dir():
        return
    for tmp in run_dir.glob("step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in run_dir.glob("step-*.old"):
        final = old.with_name(old.name.removesuffix(".old"))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names when it is complete, else the complete one with the highest step."""
    latest = run_dir / LATEST
    if latest.is_file():
        named = run_dir / latest.read_text().strip()
        if is_complete(named):
            return named
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def supersede_newer(run_dir: Path, resumed: Path) -> list[Path]:
    """Resuming from an older checkpoint abandons the later ones: rename them ``step-N.superseded`` (kept for the
    user, invisible to resume and pruning) and point ``latest`` at the resumed step."""
    step = checkpoint_step(resumed)
    moved = []
    for newer in complete_checkpoints(run_dir):
        if checkpoint_step(newer) > step:
            target = newer.with_name(newer.name + ".superseded")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(newer, target)
            moved.append(target)
    if resumed.parent.resolve() == run_dir.resolve():
        atomic_write_text(run_dir / LATEST, resumed.name + "\n")
    return moved


def find_resume_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ``auto`` = the newest of ``run_dir`` (None if there is none), otherwise the
    given checkpoint directory or run directory (its newest)."""
    if resume == "auto":
        return newest_checkpoint(run_dir)
    path = Path(resume)
    if (path / LATEST).is_file() or complete_checkpoints(path):
        newest = newest_checkpoint(path)
        if newest is None:
            raise UserError(f"--resume {path}: the run directory has no complete checkpoint")
        return newest
    if not path.is_dir():
        raise UserError(f"--resume {path}: no such checkpoint or run directory")
    missing = [piece for piece in PIECES if not (path / piece).is_file()]
    if missing or not STEP_DIR.match(path.name):
        what = f"missing {', '.join(missing)}" if missing else "its name is not step-NNNNNN"
        raise UserError(f"--resume {path}: not a complete checkpoint ({what})")
    return path


def read_train_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / "train_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{checkpoint / 'train_state.json'}: unreadable ({e})") from None


def read_optimizer_state(checkpoint: Path, map_location) -> dict:
    return torch.load(checkpoint / "optimizer.pt", map_location=map_location, weights_only=True)


def read_rng_states(checkpoint: Path) -> list[dict]:
    return torch.load(checkpoint / "rng.pt", weights_only=True)["ranks"]


def capture_rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
