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

Two formats, behind one API (``Checkpoints``: ``save``, ``finish``, ``load``); ``checkpoint.format`` picks:

- *full*: the model and optimizer state gathered whole to the main rank and written there, synchronously
  (``model.safetensors``, ``optimizer.pt``). Resuming on several ranks, the main rank reads them and broadcasts
  them (``broadcast_from_rank0``): one copy in host memory, not one per rank.
- *sharded* (the default under FSDP): ``torch.distributed.checkpoint`` (DCP). Every rank writes its own shards of
  the model and optimizer state into ``sharded/`` (``__<rank>_0.distcp``; DCP's ``.metadata`` says where each
  piece of each tensor lies) with ``async_save``: the step's state is copied to host memory, and training goes on
  while a background thread writes it. The small pieces (loader, counters, guard, ``model_config.json``) are
  written by the main rank into the same ``step-N.tmp``. Once DCP has gathered every rank's "written" (its
  ``.metadata`` comes last), the main rank, still in the background, writes the manifest (every shard's size and
  sha256), fsyncs and renames exactly as above, then prunes. One save is in flight at a time: the next save, the
  end of the run and a stop wait for it first, and every rank learns its outcome together. Loading reshards: DCP
  reads into this run's shards whatever the number of ranks that wrote them, so N ranks resume on M.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import torch

from .. import dist, runs
from ..config import Config
from ..errors import UserError
from ..files import atomic_write_text, explain, free_space, fsync_dir
from ..models import tied_weights
from ..optim.schedules import schedule_change, schedule_settings
from ..runs import MANIFEST, checkpoint_step, complete_checkpoints, step_dir_name
from ..weights import (
    MODEL_CONFIG_FILE,
    MODEL_FILE,  # noqa: F401 -- the trainer names the model piece by it
    SHARDED_DIR,
    SHARDED_MODEL_KEY,
    checkpoint_model_config,
    one_process_quietly,
    read_weights,
    save_weights,
    state_mismatch,
)

log = logging.getLogger("gpt2forge.train")

OPTIMIZER_FILE = "optimizer.pt"
SHARDED_OPTIMIZERS_KEY = "optimizers"  # the optimizers' entry in a sharded checkpoint's state
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


def _inner(wrapped: torch.nn.Module) -> torch.nn.Module:
    return getattr(wrapped, "module", wrapped)  # DDP's inner module; FSDP2 shards in place


class ModelPiece:
    """The model: its full (unsharded) state dict, gathered from FSDP shards when sharded, for a full checkpoint
    (``config`` goes into the weights file's metadata); its own shards (DTensors) for a sharded one."""

    sharded_key = SHARDED_MODEL_KEY

    def __init__(self, wrapped: torch.nn.Module, config) -> None:
        self.wrapped, self.config = wrapped, config

    @property
    def module(self) -> torch.nn.Module:
        return _inner(self.wrapped)

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def check(self, state: dict) -> str | None:
        """Why a full state read on the main rank cannot load (checked before the broadcast, which would hang)."""
        return state_mismatch(self.module, state)

    def load_state_dict(self, state: dict) -> None:
        """A full state; in a process group only the main rank's is read (the others pass {}) and broadcast."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.group_exists())
        set_model_state_dict(self.wrapped, state, options=options)

    def sharded_state_dict(self) -> dict:
        """This rank's shards; tied aliases (GPT-2's head) left out, as in the weights file: stored once."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        aliases = tied_weights(self.config)
        return {k: v for k, v in get_model_state_dict(self.wrapped).items() if k not in aliases}

    def load_sharded_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.wrapped, {**state, **{a: state[s] for a, s in tied_weights(self.config).items()}})


class OptimizersPiece:
    """Every optimizer's state by name (``{"adamw": ..., "muon": ...}``): full (unsharded) for a full checkpoint,
    each rank's own shards for a sharded one."""

    sharded_key = SHARDED_OPTIMIZERS_KEY

    def __init__(self, wrapped: torch.nn.Module, optimizers) -> None:
        self.wrapped, self.optimizers = wrapped, optimizers

    def names(self) -> list[str]:
        return [name for name, _ in self.optimizers.items()]

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {name: get_optimizer_state_dict(self.wrapped, opt, options=options)
                for name, opt in self.optimizers.items()}

    @staticmethod
    def by_name(state: dict) -> dict:
        return {"adamw": state} if "state" in state and "param_groups" in state else state  # before names: one AdamW

    def refuse_other_optimizers(self, saved: list[str]) -> None:
        if sorted(saved) != sorted(self.names()):
            raise UserError(f"the checkpoint holds the state of optimizer(s) {', '.join(saved)}, this run has "
                            f"{', '.join(self.names())}: resume with the optim.optimizer it was trained with")

    def check(self, state: dict) -> str | None:
        """Why a full state read on the main rank cannot load: other optimizers, or param groups that hold other
        parameters (checked before the broadcast, which would hang on a mismatch)."""
        state = self.by_name(state)
        try:
            self.refuse_other_optimizers(list(state))
        except UserError as e:
            return str(e)
        model = _inner(self.wrapped)
        names = {id(p): n for n, p in model.named_parameters()}
        for name, opt in self.optimizers.items():
            mine = [sorted(names[id(p)] for p in group["params"]) for group in opt.param_groups]
            try:
                saved = [sorted(group["params"]) for group in state[name]["param_groups"]]
            except (KeyError, TypeError) as e:
                return f"the checkpoint's {name} state is malformed ({type(e).__name__}: {e})"
            if saved != mine:
                return (f"the checkpoint's {name} state does not fit this run's {name} parameter groups; resume with "
                        "the optimizer settings it was trained with")
        return None

    def load_state_dict(self, state: dict) -> None:
        """A full state; in a process group only the main rank's is read (the others pass {}) and broadcast."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = self.by_name(state)
        broadcast = dist.group_exists()
        if not broadcast:
            self.refuse_other_optimizers(list(state))
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast)
        for name, opt in self.optimizers.items():
            try:
                set_optimizer_state_dict(self.wrapped, opt, optim_state_dict=state.get(name, {}), options=options)
            except (RuntimeError, KeyError, ValueError) as e:
                raise UserError(f"the checkpoint's {name} state does not fit this run's {name} parameter groups "
                                f"({e}); resume with the optimizer settings it was trained with") from None

    def sharded_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return {name: get_optimizer_state_dict(self.wrapped, opt) for name, opt in self.optimizers.items()}

    def load_sharded_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        for name, opt in self.optimizers.items():
            set_optimizer_state_dict(self.wrapped, opt, optim_state_dict=state[name])


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_dir():
            _fsync_tree(path)
            continue
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
    """A full checkpoint: gather every piece's state (all ranks), and on the writing rank save them as
    ``run_dir/step-NNNNNN`` atomically with ``extra_files`` (name → text), point ``latest`` at it and prune beyond
    ``keep_last``."""
    states = {name: piece.state_dict() for name, piece in pieces.items()}  # name = file name
    if not write:
        return None
    final = run_dir / step_dir_name(step)
    tmp = _write_files(final, pieces, states, extra_files)
    _seal(tmp, final)
    return _publish(tmp, final, keep_last)


def _write_files(final: Path, pieces: dict[str, Piece], states: dict, extra_files: dict[str, str] | None) -> Path:
    """A fresh ``step-N.tmp`` holding each piece's state in its file and the extra files; on failure it is
    removed and the error is a ``CheckpointSaveError``."""
    tmp = final.with_name(final.name + ".tmp")
    writing = None
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, piece in pieces.items():
            if name in states:
                writing = name
                write_piece(piece, states[name], tmp / name)
        for name, text in (extra_files or {}).items():
            writing = name
            (tmp / name).write_text(text)
    except Exception as e:  # torch.save and safetensors report a full disk as RuntimeError / SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(_save_failure(final, e, writing)) from e
    return tmp


def _seal(tmp: Path, final: Path) -> None:
    """The manifest of everything in ``tmp`` (written last), then every file and folder fsynced."""
    try:
        runs.write_manifest(tmp)
        _fsync_tree(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointSaveError(_save_failure(final, e, MANIFEST)) from e


def _publish(tmp: Path, final: Path, keep_last: int) -> Path:
    """Rename a sealed ``tmp`` into place (replacing an older save of the same step only once it is), point
    ``latest`` at it, check it reads back, and only then prune beyond ``keep_last``."""
    run_dir = final.parent
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


def resolve_format(setting: str, fsdp: bool) -> str:
    """``checkpoint.format``: auto = sharded under FSDP (several ranks), full otherwise."""
    return ("sharded" if fsdp else "full") if setting == "auto" else setting


class Checkpoints:
    """A run's checkpoints in its format (``full`` or ``sharded``, see the module docstring), behind ``save``,
    ``finish`` (wait for a save in flight) and ``load``; ``newest`` is the newest published checkpoint. Every
    method is collective: all ranks call it, and a failure is raised on every rank alike."""

    def __init__(self, run_dir: Path, pieces: dict[str, Piece], fmt: str, keep_last: int,
                 newest: Path | None = None) -> None:
        self.run_dir, self.pieces, self.format, self.keep_last, self.newest = run_dir, pieces, fmt, keep_last, newest
        self.pending: tuple[Path, Future] | None = None  # the sharded save in flight: (final path, its outcome)
        self.group = None
        if fmt == "sharded" and dist.group_exists():
            # the background writes' own (CPU) collectives, apart from the training loop's
            self.group = torch.distributed.new_group(backend="gloo")
        self.publisher = (ThreadPoolExecutor(1, thread_name_prefix="gpt2forge-checkpoint")  # seals and publishes
                          if fmt == "sharded" and dist.is_main() else None)

    def save(self, step: int, extra_files: dict[str, str]) -> None:
        """Save the state at ``step`` (with ``extra_files``, name → text): at once (full), or started in the
        background (sharded; ``finish`` or the next ``save`` waits for it). Raises ``CheckpointSaveError``."""
        if self.format == "full":
            failure = None
            try:
                save_checkpoint(self.run_dir, step, self.pieces, write=dist.is_main(), keep_last=self.keep_last,
                                extra_files=extra_files)
            except CheckpointSaveError as e:
                failure = str(e)
            self._settle(failure)
            self.newest = self.run_dir / step_dir_name(step)
            if dist.is_main():
                log.info("saved checkpoint %s", self.newest)
            return
        self.finish()
        self._start_sharded(step, extra_files)

    def _start_sharded(self, step: int, extra_files: dict[str, str]) -> None:
        import torch.distributed.checkpoint as dcp

        final = self.run_dir / step_dir_name(step)
        sharded = {name: piece for name, piece in self.pieces.items() if hasattr(piece, "sharded_key")}
        small = {name: piece.state_dict() for name, piece in self.pieces.items() if name not in sharded}
        model = next(piece for piece in sharded.values() if piece.sharded_key == SHARDED_MODEL_KEY)
        extra = {**extra_files, MODEL_CONFIG_FILE: json.dumps(model.config.to_dict(), indent=2) + "\n"}
        failure = None
        if dist.is_main():
            try:
                _write_files(final, self.pieces, small, extra)
            except CheckpointSaveError as e:
                failure = str(e)
        self._settle(failure)  # every rank: the directory exists before the shards go into it
        state = {piece.sharded_key: piece.sharded_state_dict() for piece in sharded.values()}
        tmp = final.with_name(final.name + ".tmp")
        if not dist.group_exists():
            one_process_quietly()
        try:  # copies the state to host memory, then writes it in a background thread
            written = dcp.async_save(state, checkpoint_id=tmp / SHARDED_DIR, process_group=self.group,
                                     no_dist=not dist.group_exists())
        except Exception as e:
            written = Future()
            written.set_exception(e)
        if self.publisher is not None:
            self.pending = (final, self.publisher.submit(self._publish_when_written, written, tmp, final))
        else:
            self.pending = (final, written)

    def _publish_when_written(self, written: Future, tmp: Path, final: Path) -> Path:
        """The main rank's background work once DCP has every rank's shards: seal, rename, prune."""
        try:
            written.result()
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointSaveError(_save_failure(final, e, SHARDED_DIR)) from e
        _seal(tmp, final)
        path = _publish(tmp, final, self.keep_last)
        log.info("saved checkpoint %s", path)
        return path

    def finish_or_warn(self) -> None:
        """``finish`` while the run is stopping anyway: a failed save is logged, not raised over the stop's own
        message."""
        try:
            self.finish()
        except CheckpointSaveError as e:
            log.warning("%s", e)

    def finish(self) -> None:
        """Wait for the save in flight (if any) to be written and published; its failure is raised on every
        rank as ``CheckpointSaveError``."""
        if self.pending is None:
            return
        final, outcome = self.pending
        self.pending = None
        failure = None
        try:
            outcome.result()
        except Exception as e:
            failure = str(e) if isinstance(e, CheckpointSaveError) else _save_failure(final, e, SHARDED_DIR)
        self._settle(failure)
        self.newest = final

    @staticmethod
    def _settle(failure: str | None) -> None:
        """The main rank's verdict on every rank (also a barrier)."""
        failure = dist.broadcast_object(failure)
        if failure is not None:
            raise CheckpointSaveError(failure)

    def load(self, checkpoint: Path) -> None:
        """Load every piece from ``checkpoint`` (verified when it was chosen), full or sharded, on any number of
        ranks."""
        load_checkpoint(checkpoint, self.pieces, verify=False)

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.shutdown(wait=True)
            self.publisher = None


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
    (all ranks). A full model or optimizer state is read by the main rank alone and broadcast; a sharded
    checkpoint's shards are read by every rank for its own part. Whatever is wrong is a ``UserError`` naming the
    file, on every rank."""
    if verify:
        problems = runs.checkpoint_problems(checkpoint)
        if problems:
            raise UserError(f"checkpoint {checkpoint} is damaged: {'; '.join(problems)}. Resume from another "
                            "checkpoint with --resume PATH")
    sharded = (checkpoint / SHARDED_DIR).is_dir()
    for name, piece in pieces.items():
        if sharded and hasattr(piece, "sharded_key"):
            continue
        path = checkpoint / name
        if not path.is_file() and name in IN_OLDER_TRAIN_STATES and (checkpoint / runs.TRAIN_STATE).is_file():
            state = IN_OLDER_TRAIN_STATES[name](read_piece(piece, checkpoint / runs.TRAIN_STATE))
            if state is not None:
                _load_piece(piece, state, path)
                continue
        if not path.is_file():
            raise UserError(f"checkpoint {checkpoint} has no {name}: it was written by another version or recipe; "
                            "resume from another checkpoint")
        if hasattr(piece, "check") and dist.group_exists():
            _load_piece(piece, _read_on_main(piece, path), path)
        else:
            _load_piece(piece, read_piece(piece, path), path)
    if sharded:
        _load_sharded(checkpoint, {name: piece for name, piece in pieces.items() if hasattr(piece, "sharded_key")})


def _read_on_main(piece, path: Path):
    """A full state read and checked by the main rank alone (the others get {} and the broadcast fills them in):
    its refusal reaches every rank before any collective starts."""
    state, message = {}, None
    if dist.is_main():
        try:
            state = read_piece(piece, path)
            message = piece.check(state)
            message = None if message is None else f"cannot resume from {path}: {message}"
        except UserError as e:
            message = str(e)
    message = dist.broadcast_object(message)
    if message is not None:
        raise UserError(message)
    return state


def _load_sharded(checkpoint: Path, pieces: dict[str, Piece]) -> None:
    """Every rank reads its own part of the model and optimizer state from DCP's shards, whoever wrote them."""
    import torch.distributed.checkpoint as dcp

    directory = checkpoint / SHARDED_DIR
    try:
        saved = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    except Exception as e:
        raise UserError(f"{directory} is damaged and cannot be read ({type(e).__name__}: {e}); resume from another "
                        "checkpoint with --resume PATH") from None
    for piece in pieces.values():
        if piece.sharded_key == SHARDED_OPTIMIZERS_KEY:
            prefix = SHARDED_OPTIMIZERS_KEY + "."
            piece.refuse_other_optimizers(sorted({k[len(prefix):].split(".")[0] for k in saved
                                                  if k.startswith(prefix)}))
    state = {piece.sharded_key: piece.sharded_state_dict() for piece in pieces.values()}  # this run's shards
    if not dist.group_exists():
        one_process_quietly()
    try:
        dcp.load(state, checkpoint_id=directory, no_dist=not dist.group_exists())
    except Exception as e:
        raise UserError(f"{directory} does not hold what this run expects ({type(e).__name__}: {str(e)[:400]}); "
                        "it is damaged or from another version: resume from another checkpoint with --resume PATH"
                        ) from None
    for piece in pieces.values():
        _load_piece(piece, state[piece.sharded_key], directory, sharded=True)


def _load_piece(piece: Piece, state, path: Path, sharded: bool = False) -> None:
    try:
        (piece.load_sharded_state_dict if sharded else piece.load_state_dict)(state)
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
    stored = checkpoint_model_config(checkpoint)
    if stored is None or stored.to_dict() != config.to_dict():
        raise UserError(f"{checkpoint} holds a different architecture ({stored}) than this run's model ({config}); "
                        "resume with the same model settings")
