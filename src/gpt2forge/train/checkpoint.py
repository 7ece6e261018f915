"""Training checkpoints: a dict of stateful pieces, each saved to its own file, atomically, the newest K kept.

The pieces are a dict ``{file name: stateful object}`` (the trainer's: the model, the optimizers, the loader,
the ``Counters`` here, and the step guard); every object has ``state_dict()``/``load_state_dict()``
(collective under FSDP: every rank calls them), and the format follows the file's suffix: ``.json`` (counters,
the loader position), ``.pt`` (tensors: optimizer state, read with ``torch.load(weights_only=True)``),
``.safetensors`` (the model, its config in the metadata, so the weights load on their own for sampling and
export). Saving and loading iterate the dict, so an EMA copy or a data mixture is one more entry.

``RUN_DIR/step-000123/`` is written as ``step-000123.tmp``: every piece, ``config.toml``, the evaluation of that
step (``training_eval.json``) if there was one, and last a ``manifest.json`` with every file's size and sha256;
each file fsynced, then the directory renamed. A directory without the suffix is therefore complete by
construction, a crash mid-save leaves the previous checkpoint untouched, and a resume verifies the files
against the manifest before trusting them. The run directory's ``latest`` is replaced atomically after the
rename, and only then are old checkpoints pruned. A save that fails (a full disk, an I/O error) removes its
temporary directory and raises ``CheckpointSaveError``; the earlier checkpoints are untouched.

Choosing what to resume (``find_resume_checkpoint``) verifies every file against the manifest. A ``step-N``
directory that fails is *damaged* (saves only ever rename a finished directory into place), and it is never
skipped silently: resuming refuses, naming it and the newest intact checkpoint to use instead.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import torch

from .. import runs
from ..config import Config
from ..errors import UserError
from ..files import atomic_write_text, explain, free_space, fsync_dir
from ..optim.schedules import schedule_change, schedule_settings
from ..runs import MANIFEST, checkpoint_step, complete_checkpoints, step_dir_name
from ..weights import MODEL_FILE, read_weights, save_weights

OPTIMIZER_FILE = "optimizer.pt"
LOADER_FILE = "loader.json"
GUARD_FILE = "guard.json"
# pieces that older checkpoints kept inside train_state.json: file name -> how to find their state there
IN_OLDER_TRAIN_STATES = {LOADER_FILE: lambda state: state.get("loader"), GUARD_FILE: lambda state: state}


class Piece(Protocol):
    """One stateful part of a run, saved to its own file in every checkpoint."""

    def state_dict(self): ...

    def load_state_dict(self, state) -> None: ...


def write_piece(piece: Piece, state, path: Path) -> None:
    if path.suffix == ".json":
        path.write_text(json.dumps(state, indent=2) + "\n")
    elif path.suffix == ".safetensors":
        save_weights(state, piece.config, path.parent)
    else:
        torch.save(state, path)


def read_piece(piece: Piece, path: Path):
    """A piece's saved state, or a UserError naming the file when it cannot be read."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        if path.suffix == ".safetensors":
            return read_weights(path, piece.config)
        return torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path} is damaged and cannot be read ({type(e).__name__}: {e}); resume from another "
                        "checkpoint with --resume PATH") from None


class ModelPiece:
    """The model's full (unsharded) state dict, gathered from FSDP shards when sharded; ``config`` goes into the
    weights file's metadata."""

    def __init__(self, wrapped: torch.nn.Module, config) -> None:
        self.wrapped, self.config = wrapped, config

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.wrapped, state, options=StateDictOptions(full_state_dict=True))


class OptimizersPiece:
    """Every optimizer's state by name (``{"adamw": ..., "muon": ...}``), full (unsharded) under FSDP."""

    def __init__(self, wrapped: torch.nn.Module, optimizers) -> None:
        self.wrapped, self.optimizers = wrapped, optimizers

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {name: get_optimizer_state_dict(self.wrapped, opt, options=options)
                for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if "state" in state and "param_groups" in state:  # saved before optimizers had names: one AdamW
            state = {"adamw": state}
        mine = [name for name, _ in self.optimizers.items()]
        if sorted(state) != sorted(mine):
            raise UserError(f"the checkpoint holds the state of optimizer(s) {', '.join(state)}, this run has "
                            f"{', '.join(mine)}: resume with the optim.optimizer it was trained with")
        options = StateDictOptions(full_state_dict=True)
        for name, opt in self.optimizers.items():
            try:
                set_optimizer_state_dict(self.wrapped, opt, optim_state_dict=state[name], options=options)
            except (RuntimeError, KeyError, ValueError) as e:
                raise UserError(f"the checkpoint's {name} state does not fit this run's {name} parameter groups "
                                f"({e}); resume with the optimizer settings it was trained with") from None


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(directory)


class Counters:
    """The trainer's own position: the step (which fixes the LR, momentum, data and random state), the training
    time over all launches, and the LR-schedule settings in force, checked against the config on resume."""

    def __init__(self, config: Config, world_size: int) -> None:
        self.config, self.world_size = config, world_size
        self.step, self.elapsed_s = 0, 0.0
        self.legacy_schedule: dict | None = None  # the schedule of a checkpoint whose train state lacks it
        self.note: str | None = None  # what the schedule check found worth saying

    def state_dict(self) -> dict:
        c = self.config
        return {"step": self.step, "tokens": self.step * c.train.total_batch_tokens, "elapsed_s": self.elapsed_s,
                "world_size": self.world_size, "schedule": schedule_settings(c.optim, c.train.max_steps),
                "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def load_state_dict(self, state: dict) -> None:
        step, max_steps = int(state["step"]), self.config.train.max_steps
        if step > max_steps:
            started = (state.get("schedule") or {}).get("max_steps")
            raise UserError(
                f"the checkpoint is at step {step}, past train.max_steps={max_steps}: the run has trained further than "
                f"this config asks (it was started with train.max_steps={started}). To train on, raise "
                f"--train.max_steps above {step}; to use the checkpoint as it is: gpt2forge eval / sample / export"
            )
        stored = state.get("schedule")
        c = self.config
        self.note = schedule_change(stored if isinstance(stored, dict) else self.legacy_schedule, c.optim,
                                    max_steps, step, c.train.reschedule)
        self.step, self.elapsed_s = step, float(state.get("elapsed_s", 0.0))


class CheckpointSaveError(UserError):
    """A checkpoint could not be written; its temporary directory is gone and the earlier checkpoints are intact."""


def save_checkpoint(run_dir: Path, step: int, pieces: dict[str, Piece], *, keep_last: int, write: bool,
                    extra_files: dict[str, str] | None = None) -> Path | None:
    """Gather every piece's state (all ranks), and on the writing rank save them as ``run_dir/step-NNNNNN``
    atomically with ``extra_files`` (name → text), point ``latest`` at it and prune beyond ``keep_last``."""
    states = {name: piece.state_dict() for name, piece in pieces.items()}  # name = file name
    if not write:
        return None
    final = run_dir / step_dir_name(step)
    tmp = run_dir / (final.name + ".tmp")
    writing = None
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, piece in pieces.items():
            writing = name
            write_piece(piece, states[name], tmp / name)
        for name, text in (extra_files or {}).items():
            writing = name
            (tmp / name).write_text(text)
        writing = MANIFEST
        runs.write_manifest(tmp)
        writing = None
        _fsync_tree(tmp)
    except Exception as e:  # torch.save and safetensors report a full disk as RuntimeError / SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(_save_failure(final, e, writing)) from e
    replaced = None
    try:
        if final.exists():  # re-saving a step (a stop signal right after a periodic save): keep the old one until done
            replaced = final.with_name(final.name + ".old")
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
    except OSError as e:
        if replaced is not None and not final.exists():
            os.replace(replaced, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(_save_failure(final, e, None)) from e
    fsync_dir(run_dir)
    try:
        atomic_write_text(run_dir / runs.LATEST, final.name + "\n")
    except OSError as e:  # the checkpoint is complete; resume finds it by its step, but stop: the disk is failing
        raise CheckpointSaveError(f"saved {final}, but could not update {run_dir / runs.LATEST}: {explain(e)}. "
                                  "No checkpoint was pruned") from e
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    if runs.checkpoint_problems(final, full=False):  # never prune on the word of a checkpoint that reads back wrong
        raise CheckpointSaveError(f"{final} does not read back as written ({'; '.join(runs.checkpoint_problems(final))}"
                                  "); no checkpoint was pruned. Check the disk")
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _save_failure(final: Path, error: Exception, writing: str | None) -> str:
    what = f" (while writing {writing})" if writing else ""
    if isinstance(error, OSError):
        reason = explain(error)
    else:
        free = free_space(final.parent)
        reason = f"{type(error).__name__}: {error}"
        if free is not None:
            reason += f" ({free:,} bytes free on that filesystem)"
    return (f"could not save checkpoint {final}{what}: {reason}. Its temporary directory {final.name}.tmp was "
            "removed; the earlier checkpoints are untouched")


def load_checkpoint(checkpoint: Path, pieces: dict[str, Piece], verify: bool = True) -> None:
    """Verify ``checkpoint`` against its manifest (unless the caller just did), then load every piece from it
    (all ranks). Whatever is wrong is a ``UserError`` naming the file."""
    if verify:
        problems = runs.checkpoint_problems(checkpoint)
        if problems:
            raise UserError(f"checkpoint {checkpoint} is damaged: {'; '.join(problems)}. Resume from another "
                            "checkpoint with --resume PATH")
    for name, piece in pieces.items():
        path = checkpoint / name
        if not path.is_file() and name in IN_OLDER_TRAIN_STATES and (checkpoint / runs.TRAIN_STATE).is_file():
            state = IN_OLDER_TRAIN_STATES[name](read_piece(piece, checkpoint / runs.TRAIN_STATE))
            if state is not None:
                _load_piece(piece, state, path)
                continue
        if not path.is_file():
            raise UserError(f"checkpoint {checkpoint} has no {name}: it was written by another version or recipe; "
                            "resume from another checkpoint")
        _load_piece(piece, read_piece(piece, path), path)


def _load_piece(piece: Piece, state, path: Path) -> None:
    try:
        piece.load_state_dict(state)
    except UserError as e:
        raise UserError(f"cannot resume from {path}: {e}") from None
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, ArithmeticError, RuntimeError) as e:
        raise UserError(f"{path} does not hold what this run expects ({type(e).__name__}: {e}); it is damaged or "
                        "from another version: resume from another checkpoint with --resume PATH") from None


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


def supersede_newer(run_dir: Path, resumed: Path) -> list[Path]:
    """Resuming from an older checkpoint abandons the later ones, damaged ones included: rename them
    ``step-N.superseded`` (kept for the user, invisible to resume and pruning) and point ``latest`` at the
    resumed step."""
    step = checkpoint_step(resumed)
    moved = []
    for newer in runs.step_dirs(run_dir):
        if checkpoint_step(newer) > step:
            target = newer.with_name(newer.name + ".superseded")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(newer, target)
            moved.append(target)
    if resumed.parent.resolve() == run_dir.resolve():
        atomic_write_text(run_dir / runs.LATEST, resumed.name + "\n")
    return moved


def find_resume_checkpoint(run_dir: Path, resume: str, how_to_resume=None) -> Path | None:
    """The verified checkpoint to resume from: ``auto`` = the newest of ``run_dir`` (None if it has none),
    otherwise the given checkpoint directory or run directory (its newest). A damaged choice is refused, never
    replaced by another one: the ``UserError`` names it, why, and the newest intact checkpoint, with the command
    ``how_to_resume(path)`` (default: ``--resume PATH``) that continues from it."""
    how_to_resume = how_to_resume or (lambda p: f"--resume {p}")
    if resume == "auto":
        return _newest_verified(run_dir, how_to_resume)
    path = Path(resume)
    if (path / runs.LATEST).is_file() or runs.step_dirs(path):
        newest = _newest_verified(path, how_to_resume)
        if newest is None:
            raise UserError(f"--resume {path}: the run directory has no checkpoint")
        return newest
    if not path.is_dir():
        raise UserError(f"--resume {path}: no such checkpoint or run directory")
    if not runs.STEP_DIR.match(path.name):
        raise UserError(f"--resume {path}: not a checkpoint (its name is not step-NNNNNN)")
    problems = runs.checkpoint_problems(path)
    if problems:
        raise UserError(f"--resume {path}: the checkpoint is damaged ({'; '.join(problems)}). Nothing was changed. "
                        + _instead(path, how_to_resume))
    return path


def _newest_verified(run_dir: Path, how_to_resume) -> Path | None:
    candidates = runs.step_dirs(run_dir)
    if not candidates:
        return None
    newest = candidates[-1]
    problems = runs.checkpoint_problems(newest)
    if not problems:
        return newest
    raise UserError(
        f"the newest checkpoint of {run_dir}, {newest.name}, is damaged ({'; '.join(problems)}), and resume does not "
        f"skip a damaged checkpoint on its own. Nothing was changed. " + _instead(newest, how_to_resume)
    )


def _instead(damaged: Path, how_to_resume) -> str:
    """What to do about a damaged checkpoint: the newest intact one before it, and the command that uses it."""
    older = [p for p in runs.step_dirs(damaged.parent) if checkpoint_step(p) < checkpoint_step(damaged)]
    intact = next((p for p in reversed(older) if not runs.checkpoint_problems(p)), None)
    if intact is None:
        return (f"No intact checkpoint precedes it. Restore {damaged.name} (e.g. from a backup) and run again, or "
                "start the run over with --train.restart=true (its checkpoints are moved to a previous-* folder "
                "in the run directory, not deleted)")
    return (f"The newest intact checkpoint is {intact} (step {checkpoint_step(intact)}). To continue from it — the "
            f"checkpoints after it are then set aside as step-N.superseded, not deleted — run: "
            f"{how_to_resume(intact)}. Or restore {damaged.name} and run the same command again")


def check_architecture(checkpoint: Path, config) -> None:
    """Refuse to resume ``checkpoint`` into a model of another architecture (``config``: the run's model config)."""
    from ..weights import read_model_config

    stored = read_model_config(checkpoint / MODEL_FILE)
    if stored is None or stored.to_dict() != config.to_dict():
        raise UserError(f"{checkpoint} holds a different architecture ({stored}) than this run's model ({config}); "
                        "resume with the same model settings")
