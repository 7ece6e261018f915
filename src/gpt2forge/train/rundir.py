"""The run directory through one launch: lock it, decide what to resume, claim it, record the launch, release it.

``runs.py`` names the files; this is their lifecycle. The main rank does all of it (the trainer shares each
decision with the other ranks), in an order that makes a refused launch change nothing:

1. ``choose``: lock the directory (``runs.RunLock``: one launch at a time), finish what a crash left (stale
   ``step-*.tmp``, a half-replaced ``step-*.old``), and pick the checkpoint to resume: ``--resume`` alone takes
   the newest (a damaged one is refused by name, never skipped); a directory that has checkpoints is never
   trained over without ``--resume`` or ``--train.restart=true``. ``--resume`` that finds no checkpoint at all
   starts from step 0 with a warning in capitals (a resumable job's first launch does exactly that; a mistyped
   run name shows up in the first line of the log).
2. ``claim``, once every check has passed: a restart sets the run's history aside (``previous-<time>/``), a resume
   from an older checkpoint sets the later ones aside (``step-N.superseded``). From here on the launch changes
   the directory.
3. ``record_launch``: ``run.json`` gets the launch (command, versions, hardware); the run's tracker id (W&B) is
   made once per run and per restart, kept in ``tracker_id``.
4. ``release``: unlock; a launch that failed before claiming a directory it created leaves nothing behind.

The command line of the launch comes from the command layer (``argv``): the resume hints repeat it with
``--resume PATH``.
"""

from __future__ import annotations

import dataclasses
import secrets
import shlex
from pathlib import Path

from .. import runs
from ..config import Config, load_config, to_toml
from ..errors import UserError
from ..files import atomic_write_text, explain
from ..optim.schedules import schedule_settings
from . import checkpoint as ckpt


def saved_config(config: Config) -> str:
    """The resolved config as saved with the run; the per-launch switches (restart, reschedule) left off."""
    return to_toml(dataclasses.replace(config, train=dataclasses.replace(config.train, restart=False,
                                                                          reschedule=False)))


def schedule_in_config(checkpoint: Path) -> dict | None:
    """The schedule settings of a checkpoint's saved config (None when missing or unreadable): for train states
    written before schedules were stored in them."""
    path = checkpoint / runs.RUN_CONFIG
    try:
        config = load_config(str(path)) if path.is_file() else None
    except (UserError, OSError):
        return None
    return None if config is None else schedule_settings(config.optim, config.train.max_steps)


class RunDir:
    """One launch's view of its run directory ``out_dir/run_name``."""

    def __init__(self, config: Config, argv: list[str] | None = None) -> None:
        self.config = config
        self.path = Path(config.log.out_dir) / (config.log.run_name or config.name or "run")
        self.argv = argv  # the command line after `gpt2forge` (None: train() called from Python)
        self.lock: runs.RunLock | None = None
        self.notes: list[str] = []  # warnings for the run's log, once it is open

    def command(self) -> str:
        return shlex.join(["gpt2forge", *self.argv]) if self.argv else "train() called from Python"

    def resume_command(self, checkpoint: Path) -> str:
        """This launch's command line with ``--resume checkpoint`` in place of any ``--resume``."""
        if not self.argv or self.argv[0] != "train":
            return f"the same command with --resume {checkpoint}"
        kept, skip = [], False
        for i, arg in enumerate(self.argv):
            if skip:
                skip = False
            elif arg == "--resume":
                skip = i + 1 < len(self.argv) and not self.argv[i + 1].startswith("-")
            elif not arg.startswith("--resume="):
                kept.append(arg)
        return shlex.join(["gpt2forge", *kept, "--resume", str(checkpoint)])

    def choose(self, resume: str | None) -> str | None:
        """Lock, finish stale temporaries, choose the checkpoint to resume (a path, or None: step 0). Changes no
        checkpoint and no record."""
        c = self.config
        if resume is not None and c.train.restart:
            raise UserError("train.restart=true starts the run over; it cannot be combined with --resume")
        self.lock = runs.RunLock(self.path)
        try:
            self.notes += self.lock.acquire(command=self.command())
        except OSError as e:
            raise UserError(f"cannot use the run directory {explain(e, self.path)} (--log.out_dir, "
                            "--log.run_name)") from None
        ckpt.remove_stale_temporaries(self.path)
        existing = runs.step_dirs(self.path)
        if resume is None and existing and not c.train.restart:
            damaged = [p.name for p in existing if not runs.is_complete(p)]
            raise UserError(
                f"run directory {self.path} already has checkpoints (newest: {existing[-1].name}"
                + (f"; incomplete or damaged: {', '.join(damaged)}" if damaged else "")
                + "); pass --resume to continue that run, --train.restart=true to start it over (its checkpoints "
                "and metrics are moved to a previous-* folder, not deleted), or --log.run_name=NEW to start another"
            )
        chosen = None if resume is None else ckpt.find_resume_checkpoint(self.path, resume, self.resume_command)
        if resume == "auto" and chosen is None:
            self.notes.append(f"NOTHING TO RESUME: --resume found no checkpoint in {self.path}, so this launch starts "
                              "the run from step 0 (right for a resumable job's first launch; if you meant another "
                              "run, stop and check --log.out_dir / --log.run_name)")
        return None if chosen is None else str(chosen)

    def claim(self, resume_from: Path | None) -> None:
        """Once every check has passed: set a restarted run's history aside, or the checkpoints after the one
        resumed."""
        if self.config.train.restart:
            moved = runs.set_aside(self.path)
            if moved is not None:
                self.notes.append(f"train.restart=true: the run starts over; its earlier checkpoints and metrics "
                                  f"are kept in {moved}")
        if resume_from is not None:
            for moved in ckpt.supersede_newer(self.path, resume_from):
                self.notes.append(f"resuming from {resume_from.name}: the later checkpoint "
                                  f"{moved.name.removesuffix('.superseded')} is set aside as {moved}")

    def tracker_id(self) -> str:
        """The run's id for experiment trackers (W&B): made on its first launch and after each restart (the old
        one moves to ``previous-*`` with the history), reused by every resume."""
        path = self.path / runs.TRACKER_ID
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        run_id = secrets.token_hex(6)
        atomic_write_text(path, run_id + "\n")
        return run_id

    def record_launch(self, launch: dict) -> list[str]:
        """Write the config and add this launch to ``run.json``; returns warnings."""
        atomic_write_text(self.path / runs.RUN_CONFIG, saved_config(self.config))
        return runs.append_launch(self.path, {"command": self.command(), **launch})

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
