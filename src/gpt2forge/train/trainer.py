"""The pretraining loop, from one CPU to many GPUs, resumable exactly: ``train(config, resume)``.

The loop is ours; Hugging Face ``accelerate`` supplies the process-group plumbing (``parallelize.py``). One
optimizer step: ``grad_accum`` micro-batches (no gradient all-reduce until the last), global gradient-norm
clipping, a check that loss and norm are finite and that the loss is no spike (such a step is skipped, never
applied), the optimizers, then a check that the weights are still finite (one fused reduction; if not, the run
stops at once, and nothing is saved). Around it, at their cadences: validation loss, HellaSwag, samples
(``evaluation.py``), checkpoints. A SIGTERM/SIGINT finishes the current step, saves and exits.

A launch owns its run directory: the main rank locks it (``runs.RunLock``) before touching anything in it, and
every choice that involves files — the lock, which checkpoint to resume, whether the directory may be used —
is made on the main rank and shared with the others (``on_main``), so a refused launch stops on every rank and
changes nothing. A failed save or log write stops the run with a message rather than training on without them.

Everything that decides the next step is in the checkpoint (``checkpoint.py``: model, optimizers, loader
position, counters with the spike guard's window) or is a pure function of the step: the LR and momentum
schedules, and the random state, which is reseeded from (seed, step, rank) at every step, so a resumed run
continues bit for bit. The schedule's settings are stored too: a resume that would change the LR curve is
refused unless ``train.reschedule`` says so.
Autocast is applied here rather than through accelerate's ``mixed_precision``, which would also upcast the
returned [B, T, V] logits to fp32 — gigabytes for nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shlex
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import runs
from ..config import Config, grad_accum_steps, load_config, to_toml
from ..data.loader import TokenLoader
from ..device import autocast, autocast_dtype, hardware_summary, library_versions, peak_flops, restore_tf32, set_tf32
from ..errors import UserError
from ..files import atomic_write_text, explain
from ..models import Runtime, build_model, padding_params
from ..optim import build_optimizers, lr_at
from ..weights import MODEL_FILE, read_model_config
from . import checkpoint as ckpt
from .evaluation import InLoopEvaluation
from .metrics import MetricsLogger, llmc_flops_per_token, mfu, step_line, truncate_metrics
from .parallelize import compiled, start

log = logging.getLogger("gpt2forge.train")


class TrainingStopped(UserError):
    """The run cannot continue (e.g. repeated non-finite losses); the message says why and what to do."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step → train loss
    val_loss: float | None = None
    elapsed_s: float = 0.0
    stopped_by_signal: bool = False


class StopFlag:
    """Set by SIGTERM/SIGINT: finish the step, save, exit. A second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s received: finishing this step, saving a checkpoint, then exiting "
                    "(Ctrl-C again to abort without saving)", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


ROLES = ("matrix", "embedding", "head", "scalar")
SCHEDULE_KEYS = ("schedule", "lr", "min_lr", "warmup_steps", "decay_steps", "cooldown_fraction",
                 *(f"{role}_lr" for role in ROLES))


def schedule_settings(config: Config) -> dict:
    """The settings that decide the LR of every step: stored in the train state, compared on resume."""
    return {"max_steps": config.train.max_steps, **{key: getattr(config.optim, key) for key in SCHEDULE_KEYS}}


def schedule_in_config(path: Path) -> dict | None:
    """The schedule settings of a saved config (None when it is missing or unreadable)."""
    try:
        return schedule_settings(load_config(str(path))) if path.is_file() else None
    except (UserError, OSError):
        return None


def lr_curve(optim, max_steps: int, step: int) -> tuple[float, ...]:
    """Every role's LR at ``step`` (as ``Optimizers.set_step`` computes them)."""
    base = lr_at(step, optim, max_steps)
    return tuple(base * (optim.role_lr(role) / optim.lr) for role in ROLES)


class Counters:
    """The trainer's own state: the step (which fixes the LR, momentum, data and random state), the training
    time over all launches, the run of consecutive skipped steps, the spike guard's window of recent losses, and
    the LR-schedule settings in force (``schedule_settings``), checked against the config on resume."""

    def __init__(self, config: Config, world_size: int) -> None:
        self.config, self.world_size = config, world_size
        self.step, self.elapsed_s, self.bad_steps, self.first_bad_step = 0, 0.0, 0, None
        self.losses: deque[float] = deque(maxlen=config.train.spike_window)  # losses of the last applied steps
        self.notes: list[str] = []  # what a resume found worth saying (logged once the run's log is open)
        self.legacy_schedule: dict | None = None  # the schedule of a checkpoint whose train state lacks it

    def state_dict(self) -> dict:
        return {
            "step": self.step, "tokens": self.step * self.config.train.total_batch_tokens,
            "elapsed_s": self.elapsed_s, "bad_steps": self.bad_steps, "first_bad_step": self.first_bad_step,
            "world_size": self.world_size, "schedule": schedule_settings(self.config),
            "loss_window": list(self.losses),
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def load_state_dict(self, state: dict) -> None:
        step, max_steps = int(state["step"]), self.config.train.max_steps
        if step > max_steps:
            started = (state.get("schedule") or {}).get("max_steps")
            raise UserError(
                f"the checkpoint is at step {step}, past train.max_steps={max_steps}: the run has trained further than "
                f"this config asks (it was started with train.max_steps={started}). To train on, raise "
                f"--train.max_steps above {step}; to use the checkpoint as it is: gpt2forge eval / sample / export"
            )
        self.check_schedule(state.get("schedule"), step)
        self.step, self.elapsed_s = step, float(state.get("elapsed_s", 0.0))
        self.bad_steps = int(state.get("bad_steps", 0))
        first = state.get("first_bad_step")
        self.first_bad_step = None if first is None else int(first)
        self.losses = deque((float(x) for x in state.get("loss_window", [])), maxlen=self.config.train.spike_window)

    def check_schedule(self, stored: dict | None, step: int) -> None:
        """Refuse a resume that would change the LR of the coming steps, unless ``train.reschedule`` is set. A
        train state written before schedules were stored is checked against its checkpoint's ``config.toml``."""
        stored = stored if isinstance(stored, dict) else self.legacy_schedule
        if stored is None:
            self.notes.append("the checkpoint records no LR schedule (an older version wrote it): the config's "
                              "schedule is used as it is")
            return
        mine = schedule_settings(self.config)
        changed = {key: (stored.get(key), value) for key, value in mine.items() if stored.get(key) != value}
        if not changed:
            return
        old_optim = dataclasses.replace(self.config.optim, **{k: stored[k] for k in SCHEDULE_KEYS if k in stored})
        old_max, new_max = int(stored.get("max_steps", mine["max_steps"])), mine["max_steps"]
        first = next((s for s in range(step, new_max)
                      if lr_curve(old_optim, old_max, s) != lr_curve(self.config.optim, new_max, s)), None)
        what = ", ".join(f"{'train' if key == 'max_steps' else 'optim'}.{key} {old} → {new}"
                         for key, (old, new) in changed.items())
        if first is None:
            self.notes.append(f"resuming with {what}: the LR of the coming steps is unchanged by it")
            return
        follows = ""
        if self.config.optim.schedule == "cosine" and self.config.optim.decay_steps is None and "max_steps" in changed:
            follows = " (optim.decay_steps is unset, so the cosine decay ends at train.max_steps)"
        elif self.config.optim.schedule == "wsd" and "max_steps" in changed:
            follows = " (the wsd cooldown is the last optim.cooldown_fraction of train.max_steps)"
        old_lr, new_lr = lr_at(first, old_optim, old_max), lr_at(first, self.config.optim, new_max)
        jump = (f"the LR of step {first + 1} would be {new_lr:.3g} instead of {old_lr:.3g}"
                + (f" (×{new_lr / old_lr:.2g})" if old_lr > 0 else ""))
        if self.config.train.reschedule:
            self.notes.append(f"train.reschedule=true: the LR schedule changes: {what}{follows}; {jump}")
            return
        keep = "resume with the run's own settings"
        if follows and self.config.optim.schedule == "cosine":
            keep += (f" (to train past the end of its schedule at its final LR, set "
                     f"--optim.decay_steps={stored.get('decay_steps') or old_max} explicitly)")
        raise UserError(f"this run was started with another LR schedule: {what}{follows}. Resuming at step {step}, "
                        f"{jump}. To keep the run's schedule, {keep}; to adopt the new one, add "
                        "--train.reschedule=true")

    def loss_zscore(self, loss: float) -> float | None:
        """How many standard deviations ``loss`` is above the mean of the window (None while the window holds
        fewer than ``train.spike_min_history`` losses; 0 when they are all equal)."""
        window = self.losses
        if len(window) < self.config.train.spike_min_history:
            return None
        mean = math.fsum(window) / len(window)
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in window) / len(window))
        return (loss - mean) / std if std > 0 else 0.0


def seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed torch's RNG from (seed, step, rank): the random state is a function of the step, never stored."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1))


def check_device_request(wanted: str) -> None:
    """Refuse a device this machine does not have before anything starts (torch would fail later, deep inside);
    ``cuda:N`` in one process makes GPU N the current one (accelerate then places the run there)."""
    if wanted.startswith("cuda"):
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver? CUDA_VISIBLE_DEVICES?)")
            raise UserError(f"train.device={wanted}, but CUDA is not available here: {why}; use --train.device=cpu "
                            "(or auto)")
        index = torch.device(wanted).index
        if index is not None:
            count = torch.cuda.device_count()
            if index >= count:
                raise UserError(f"train.device={wanted}, but this machine has {count} CUDA device(s): cuda:0 to "
                                f"cuda:{count - 1}")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise UserError(f"train.device={wanted}: under torchrun / accelerate launch each process takes the GPU "
                                "of its local rank; use --train.device=cuda (and CUDA_VISIBLE_DEVICES to pick GPUs)")
            torch.cuda.set_device(index)
    elif wanted == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device=mps, but MPS (an Apple GPU) is not available here; use --train.device=cpu "
                        "(or auto)")


def resume_command(checkpoint: Path) -> str:
    """The command line of this launch with ``--resume checkpoint`` in place of any ``--resume``."""
    argv = sys.argv[1:]
    if not argv or argv[0] != "train":
        return f"the same command with --resume {checkpoint}"
    kept, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
        elif not arg.startswith("--resume="):
            kept.append(arg)
    return shlex.join(["gpt2forge", *kept, "--resume", str(checkpoint)])


class _RunLogHandler(logging.FileHandler):
    """``train.log``: a write error (a full disk) is remembered for the loop to stop on, not printed per line."""

    error: str | None = None

    def handleError(self, record) -> None:
        if self.error is None:
            exc = sys.exc_info()[1]
            self.error = explain(exc, self.baseFilename) if isinstance(exc, OSError) else f"{self.baseFilename}: {exc}"


class Trainer:
    """Owns every piece of run state; ``run()`` trains to ``train.max_steps`` (or a given step) or until stopped.
    ``close()`` releases the run directory (also when the constructor fails)."""

    def __init__(self, config: Config, resume: str | None = None) -> None:
        self.config = config
        self.lock: runs.RunLock | None = None
        self.metrics, self._log_handler, self.io_error, self.tf32_before = None, None, None, None
        self.notes: list[str] = []  # warnings met before the run's log file was open
        check_device_request(config.train.device)
        self.parallel = start(config.train)
        try:
            self.check_device()
            self.grad_accum = grad_accum_steps(config, self.parallel.world_size)
            self.autocast_dtype = autocast_dtype(config.train.precision, self.parallel.device)
            if self.parallel.device.type == "cuda":  # restored by close()
                self.tf32_before = set_tf32(config.train.tf32)
            self.setup_run_dir(resume)
            self.setup_model()
            self.setup_data()
            self.pieces: dict[str, ckpt.Piece] = {  # file name in the checkpoint: what is saved there
                ckpt.MODEL_FILE: ckpt.ModelPiece(self.wrapped, self.model.config),
                ckpt.OPTIMIZER_FILE: ckpt.OptimizersPiece(self.wrapped, self.optimizers),
                ckpt.LOADER_FILE: self.loader,
                runs.TRAIN_STATE: self.counters,
            }
            if self.resume_from is not None:
                self.counters.legacy_schedule = schedule_in_config(self.resume_from / runs.RUN_CONFIG)
                ckpt.load_checkpoint(self.resume_from, self.pieces, verify=False)  # verified when it was chosen
                if not self.weights_finite():
                    raise UserError(f"{self.resume_from} holds non-finite weights (a version that did not check them "
                                    "saved it): resume from an earlier checkpoint with --resume PATH")
                self.notes += self.counters.notes
            self.on_main(self.claim_run_dir)
            self.setup_logging()
        except BaseException:
            self.close()
            raise

    @property
    def step(self) -> int:
        return self.counters.step

    # ---------------------------------------------------------------- across ranks
    def share(self, value):
        """The main rank's ``value`` on every rank (a broadcast; also a barrier)."""
        if self.parallel.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, action):
        """Run ``action`` on the main rank only; every rank gets its return value, or raises its error (a
        ``UserError``; an ``OSError`` is explained). So a refusal on the main rank stops every rank."""
        result, message, error = None, None, None
        if self.parallel.is_main:
            try:
                result = action()
            except UserError as e:
                error, message = e, str(e)
            except OSError as e:
                message = explain(e)
                error = UserError(message)
            except Exception as e:  # a bug: the main rank shows its traceback, the others do not hang
                error, message = e, f"the main process failed ({type(e).__name__}: {e})"
        result, message = self.share((result, message))
        if message is not None:
            raise error if error is not None else UserError(message)
        return result

    # ---------------------------------------------------------------- setup
    def check_device(self) -> None:
        wanted, got = self.config.train.device, self.parallel.device
        if wanted not in ("auto", "cpu") and got.type != torch.device(wanted).type:
            raise UserError(f"train.device={wanted} requested, but accelerate placed this process on {got}")

    def setup_run_dir(self, resume: str | None) -> None:
        """Lock the run directory and choose the checkpoint to resume (main rank; nothing is changed yet)."""
        c = self.config
        self.run_dir = Path(c.log.out_dir) / (c.log.run_name or c.name or "run")
        if resume is not None and c.train.restart:
            raise UserError("train.restart=true starts the run over; it cannot be combined with --resume")
        chosen = self.on_main(lambda: self.choose_checkpoint(resume))
        self.resume_from = None if chosen is None else Path(chosen)

    def choose_checkpoint(self, resume: str | None) -> str | None:
        c = self.config
        self.lock = runs.RunLock(self.run_dir)
        try:
            self.notes += self.lock.acquire(command=shlex.join(["gpt2forge", *sys.argv[1:]]))
        except OSError as e:
            raise UserError(f"cannot use the run directory {explain(e, self.run_dir)} (--log.out_dir, "
                            "--log.run_name)") from None
        ckpt.remove_stale_temporaries(self.run_dir)
        existing = runs.step_dirs(self.run_dir)
        if resume is None and existing and not c.train.restart:
            damaged = [p.name for p in existing if not runs.is_complete(p)]
            raise UserError(
                f"run directory {self.run_dir} already has checkpoints (newest: {existing[-1].name}"
                + (f"; incomplete or damaged: {', '.join(damaged)}" if damaged else "")
                + "); pass --resume to continue that run, --train.restart=true to start it over (its checkpoints "
                "and metrics are moved to a previous-* folder, not deleted), or --log.run_name=NEW to start another"
            )
        chosen = None if resume is None else ckpt.find_resume_checkpoint(self.run_dir, resume, resume_command)
        return None if chosen is None else str(chosen)

    def claim_run_dir(self) -> None:
        """Once every check has passed (main rank): set a restarted run's history aside, or the checkpoints
        after the one resumed; from here on the launch changes the run directory."""
        if self.config.train.restart:
            moved = runs.set_aside(self.run_dir)
            if moved is not None:
                self.notes.append(f"train.restart=true: the run starts over; its earlier checkpoints and metrics "
                                  f"are kept in {moved}")
        if self.resume_from is not None:
            for moved in ckpt.supersede_newer(self.run_dir, self.resume_from):
                self.notes.append(f"resuming from {self.resume_from.name}: the later checkpoint "
                                  f"{moved.name.removesuffix('.superseded')} is set aside as {moved}")

    def setup_model(self) -> None:
        c, p = self.config, self.parallel
        torch.manual_seed(c.train.seed)
        runtime = Runtime(attention=c.train.attention, loss=c.train.loss)
        self.model = build_model(c.model, runtime).to(p.device)  # the unwrapped module: weights, sampling, export
        if self.resume_from is not None:
            self.check_architecture(self.resume_from)
        self.wrapped = p.wrap(self.model)
        self.optimizers = build_optimizers(self.model, c.optim, p.device.type, c.train.max_steps)
        self.train_model = compiled(self.wrapped, c.train.compile)
        self.flops_per_token = self.model.flops_per_token(c.train.seq_len)
        self.llmc_flops_per_token = llmc_flops_per_token(self.model, c.train.seq_len)  # MFU as llm.c counts it
        self.peak_flops = peak_flops(p.device)
        self.counters = Counters(c, p.world_size)
        self.launch_elapsed_s = 0.0  # training time of this launch (for the ETA)
        self.last_evals: dict = {}  # the newest evaluation results, saved with a checkpoint of the same step
        self.last_checkpoint: Path | None = self.resume_from  # the newest checkpoint known healthy
        self.evaluation = InLoopEvaluation(c, self.model, self.train_model, p, self.autocast_dtype)

    def setup_data(self) -> None:
        c, p = self.config, self.parallel
        self.loader = TokenLoader(
            c.data.dir, c.train.micro_batch_size, c.train.seq_len, rank=p.rank, world_size=p.world_size,
            grad_accum=self.grad_accum, seed=c.train.seed, shuffle=c.data.shuffle, vocab_size=c.model.vocab_size,
            pin_memory=p.device.type == "cuda",
        )

    def saved_config(self) -> str:
        """The resolved config as saved with the run; the per-launch switches (restart, reschedule) left off."""
        c = self.config
        return to_toml(dataclasses.replace(c, train=dataclasses.replace(c.train, restart=False, reschedule=False)))

    def setup_logging(self) -> None:
        if not self.parallel.is_main:
            log.setLevel(logging.WARNING)  # one rank speaks; the others only warn
        self.on_main(self.open_run_files)

    def open_run_files(self) -> None:
        c, p = self.config, self.parallel
        handler = _RunLogHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        self._log_handler = handler
        truncate_metrics(self.run_dir / runs.METRICS, before_step=self.step + 1 if self.resume_from else 0)
        self.metrics = MetricsLogger(
            self.run_dir, trackers=c.log.trackers, project=c.log.project, run_name=self.run_dir.name,
            config=c.to_dict(),
        )
        atomic_write_text(self.run_dir / runs.RUN_CONFIG, self.saved_config())
        for note in self.notes:
            log.warning(note)
        for warning in runs.append_launch(self.run_dir, {
            "command": sys.argv, "versions": library_versions(),
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            "world_size": p.world_size, "device": str(p.device), "hardware": hardware_summary(p.device),
        }):
            log.warning(warning)
        log.info(
            "run %s | %s params (%s without the vocabulary padding) | %d rank(s) on %s | %s | batch %s tokens = "
            "%d × %d × %d ranks × %d accumulation | %s",
            self.run_dir, f"{self.model.num_params():,}", f"{self.model.num_params() - padding_params(self.model):,}",
            p.world_size, p.device,
            {None: "fp32", torch.bfloat16: "bf16 autocast"}[self.autocast_dtype], f"{c.train.total_batch_tokens:,}",
            c.train.micro_batch_size, c.train.seq_len, p.world_size, self.grad_accum,
            f"resuming from {self.resume_from} at step {self.step}" if self.resume_from else "fresh start",
        )

    # ---------------------------------------------------------------- checkpoints
    def check_architecture(self, checkpoint: Path) -> None:
        stored = read_model_config(checkpoint / MODEL_FILE)
        mine = self.model.config
        if stored is None or stored.to_dict() != mine.to_dict():
            raise UserError(
                f"{checkpoint} holds a different architecture ({stored}) than this run's model ({mine}); "
                "resume with the same model settings"
            )

    def weights_finite(self) -> bool:
        """Whether every weight is finite: one fused norm over the parameters (this rank's shards under FSDP,
        summed over ranks), one host sync. An overflowing norm counts as non-finite: such weights have exploded."""
        with torch.no_grad():
            local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
            local = [t.detach() for t in local if t.numel()]
            if local:
                total = torch.stack([n.float() for n in torch._foreach_norm(local)]).sum()
            else:
                total = torch.zeros((), device=self.parallel.device)
            if self.parallel.fsdp:
                dist.all_reduce(total)
            return math.isfinite(total.item())

    def save_checkpoint(self) -> Path | None:
        """Save the step's checkpoint (all ranks take part) — only healthy weights. A failed save stops the run on
        every rank: going on without checkpoints would put days of work at risk."""
        if not self.weights_finite():  # the loop checks every update; this guards any other way in
            raise TrainingStopped(self.poisoned_message(self.step))
        extra = {runs.RUN_CONFIG: self.saved_config()}
        if self.last_evals.get("step") == self.step:
            extra["training_eval.json"] = json_text(self.last_evals)
        path, failure = None, None
        try:
            path = ckpt.save_checkpoint(self.run_dir, self.step, self.pieces, write=self.parallel.is_main,
                                        keep_last=self.config.checkpoint.keep_last, extra_files=extra)
        except ckpt.CheckpointSaveError as e:
            failure = str(e)
        failure = self.share(failure)
        if failure is not None:
            raise TrainingStopped(f"{failure}. The run stopped at step {self.step} rather than train on without "
                                  f"checkpoints; {self.newest_checkpoint_clause()}. Fix the cause (free space?), then "
                                  "run the same command with --resume to continue from there")
        if path is not None:
            log.info("saved checkpoint %s", path)
        self.last_checkpoint = self.run_dir / runs.step_dir_name(self.step)
        return path

    def newest_checkpoint_clause(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint of this run had been saved yet"
        step = runs.checkpoint_step(self.last_checkpoint)
        return f"the newest checkpoint, {self.last_checkpoint} (step {step}), is intact"

    # ---------------------------------------------------------------- the step
    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
        c, p = self.config, self.parallel
        seed_step(c.train.seed, self.step, p.rank)
        lr = self.optimizers.set_step(self.step)
        loss_sum = torch.zeros((), device=p.device)
        for micro in range(self.grad_accum):
            x, y = self.loader.next_batch()
            x, y = x.to(p.device, non_blocking=True), y.to(p.device, non_blocking=True)
            with p.gradient_sync(self.wrapped, micro == self.grad_accum - 1):
                with autocast(p.device, self.autocast_dtype):
                    _, loss = self.train_model(x, y)
                loss = loss / self.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        if p.world_size > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), c.optim.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a sharded (DTensor) norm
            grad_norm = grad_norm.full_tensor()
        # the step's finite check reads both numbers in one host sync (the micro-step loop has none: batches are
        # prefetched and, on CUDA, pinned, so their copies are asynchronous)
        loss_value, norm_value = torch.stack([loss_sum, grad_norm.to(loss_sum.dtype)]).tolist()
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        # the same numbers on every rank (the loss is all-reduced), so every rank decides alike
        zscore = self.counters.loss_zscore(loss_value) if finite and c.train.spike_zscore else None
        spike = zscore is not None and zscore > c.train.spike_zscore
        weights_finite = True
        if finite and not spike:
            self.optimizers.step()
            weights_finite = self.weights_finite()
            self.counters.losses.append(loss_value)
            self.counters.bad_steps, self.counters.first_bad_step = 0, None
        else:
            self.counters.bad_steps += 1
            if self.counters.bad_steps == 1:
                self.counters.first_bad_step = self.step + 1
        self.optimizers.zero_grad(set_to_none=True)
        self.counters.step += 1
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": norm_value, "finite": finite,
                "spike": spike, "zscore": zscore, "skipped": not finite or spike, "weights_finite": weights_finite}

    # ---------------------------------------------------------------- the loop
    def log_row(self, row: dict) -> None:
        if self.metrics is None or self.io_error is not None:
            return
        try:
            self.metrics.log(row)
        except OSError as e:
            self.io_error = explain(e, self.metrics.path)

    def run(self, until: int | None = None) -> TrainResult:
        """Train to ``until`` (default and at most ``train.max_steps``). Checkpoints fall on their cadence and at
        ``train.max_steps``; running to an earlier ``until`` (the benchmark's k steps) saves nothing extra."""
        c = self.config
        until = c.train.max_steps if until is None else min(until, c.train.max_steps)
        result = TrainResult(self.run_dir, self.step)
        if self.step >= c.train.max_steps:
            log.info("the run is complete: step %d = train.max_steps; nothing to train (raise --train.max_steps "
                     "to train on)", self.step)
        self.wrapped.train()
        with StopFlag() as stop:
            if self.step == 0:  # the untrained model's numbers anchor the curves
                result.val_loss = self.log_evaluation()
            while self.step < until:
                t0 = time.perf_counter()
                metrics = self.train_step()
                dt = time.perf_counter() - t0
                self.counters.elapsed_s += dt
                self.launch_elapsed_s += dt
                result.losses[self.step] = metrics["loss"]
                self.log_step(metrics, dt, first_step=result.step)
                self.check_step(metrics)
                val = self.log_evaluation()
                result.val_loss = val if val is not None else result.val_loss
                for i, text in enumerate(self.evaluation.samples(self.step)):
                    log.info("sample %d: %s", i, (c.eval.sample_prompt + text).replace("\n", "\\n"))
                stop_now = self.stop_requested(stop)
                if stop_now or self.evaluation.due(c.checkpoint.every, self.step) or self.step == c.train.max_steps:
                    self.save_checkpoint()
                if stop_now:
                    result.stopped_by_signal = True
                    log.info("stopped at step %d; resume with --resume", self.step)
                    break
        result.step, result.elapsed_s = self.step, self.counters.elapsed_s
        return result

    def log_step(self, metrics: dict, dt: float, first_step: int) -> None:
        """Console and metrics line of a step (every ``log.every`` steps, the last one, and any skipped one)."""
        c, p = self.config, self.parallel
        if not (self.step % c.log.every == 0 or self.step == c.train.max_steps or metrics["skipped"]):
            return
        tokens_per_s = c.train.total_batch_tokens / dt
        peak = self.peak_flops * p.world_size if self.peak_flops else None
        row = {
            "step": self.step, "tokens": self.step * c.train.total_batch_tokens, "elapsed_s": self.counters.elapsed_s,
            "loss": metrics["loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"], "step_ms": 1000 * dt,
            "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, self.flops_per_token, peak),
            "mfu_llmc": mfu(tokens_per_s, self.llmc_flops_per_token, peak),
        }
        self.log_row(row)
        if p.is_main:
            steps_timed = self.step - first_step
            eta = (c.train.max_steps - self.step) * self.launch_elapsed_s / steps_timed if steps_timed > 1 else None
            log.info(step_line(row, c.train.max_steps, eta))

    def check_step(self, metrics: dict) -> None:
        """Stop at once when an update left non-finite weights; say that a step was skipped, and stop the run after
        ``train.max_bad_steps`` in a row. Nothing is saved on these stops: the newest checkpoint stays the last
        word on the run."""
        if not metrics["weights_finite"]:
            raise TrainingStopped(self.poisoned_message(self.step, metrics))
        if not metrics["skipped"]:
            return
        c, bad = self.config.train, self.counters.bad_steps
        if metrics["spike"]:
            log.warning("step %d: loss %.4f is a spike, %.1f standard deviations above the mean of the last %d "
                        "(train.spike_zscore=%g): step skipped, weights unchanged (%d in a row)",
                        self.step, metrics["loss"], metrics["zscore"], len(self.counters.losses), c.spike_zscore, bad)
        else:
            log.warning("step %d: non-finite loss %s or grad norm %s: step skipped, weights unchanged (%d in a row)",
                        self.step, metrics["loss"], metrics["grad_norm"], bad)
        if bad >= c.max_bad_steps:
            first = self.counters.first_bad_step or self.step - bad + 1  # (older checkpoints did not record it)
            raise TrainingStopped(
                f"{bad} consecutive steps had a non-finite loss or gradient norm, or a loss spike (first: step "
                f"{first}, last: step {self.step}); stopping without saving. Each was skipped: no bad update reached "
                f"the weights, which are those after step {first - 1}. {self.newest_checkpoint_clause().capitalize()}. "
                "If the run diverged, lower optim.lr or raise optim.warmup_steps, then resume from that checkpoint "
                "(with --train.reschedule=true for a changed schedule); if the loss rose for a good reason (new data), "
                "raise train.spike_zscore (0 = off) and resume"
            )

    def poisoned_message(self, step: int, metrics: dict | None = None) -> str:
        before = ""
        if metrics is not None:
            before = (f" (before it the loss {metrics['loss']:.4g}, gradient norm {metrics['grad_norm']:.4g} and LR "
                      f"{metrics['lr']:.3g} were finite)")
        if self.last_checkpoint is None:
            advice = ("No checkpoint of this run had been saved before it: lower optim.lr (or raise "
                      "optim.warmup_steps) and start the run again")
        else:
            advice = (f"The last healthy checkpoint is {self.last_checkpoint} (step "
                      f"{runs.checkpoint_step(self.last_checkpoint)}): lower optim.lr (or raise optim.warmup_steps), "
                      f"then resume from it: {resume_command(self.last_checkpoint)} --train.reschedule=true")
        return (f"step {step}: the update left non-finite weights{before}. The run stopped without saving them: no "
                f"checkpoint holds them. {advice}")

    def log_evaluation(self) -> float | None:
        evals = self.evaluation.results(self.step)
        if not evals:
            return None
        val_tokens = evals.pop("val_tokens", None)
        self.last_evals = {"step": self.step, "tokens": self.step * self.config.train.total_batch_tokens, **evals}
        self.log_row(self.last_evals)
        if self.parallel.is_main:
            shown = " | ".join(f"{k} {v:.4f}" + (f" (on {val_tokens:,} val tokens)" if k == "val_loss" else "")
                               for k, v in evals.items())
            log.info("step %d | %s", self.step, shown)
        return evals.get("val_loss")

    def stop_requested(self, stop: StopFlag) -> bool:
        """Agree across ranks, so that all of them save and leave at the same step; a log the main rank cannot
        write (a full disk) stops every rank."""
        io_error = self.io_error or (self._log_handler.error if self._log_handler is not None else None)
        if self.parallel.world_size == 1:
            requested, failed = stop.requested, io_error is not None
        else:
            flags = torch.tensor([float(stop.requested), float(io_error is not None)], device=self.parallel.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            requested, failed = (bool(v) for v in flags.tolist())
        if failed:
            raise TrainingStopped(
                f"cannot write the run's logs: {io_error or 'see the main process'}. The run stopped at step "
                f"{self.step} without saving (that would fail too); {self.newest_checkpoint_clause()}. Fix the cause, "
                "then run the same command with --resume"
            )
        return requested

    def close(self) -> None:
        """Close the run's files and release its directory (safe to call more than once)."""
        if getattr(self, "loader", None) is not None:
            self.loader.close()
        if self.metrics is not None:
            try:
                self.metrics.close()
            except OSError:
                pass
            self.metrics = None
        if self._log_handler is not None:
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.tf32_before is not None:
            restore_tf32(self.tf32_before)
            self.tf32_before = None


def json_text(data: dict) -> str:
    import json

    return json.dumps(data, indent=2) + "\n"


def train(config: Config, resume: str | None = None) -> TrainResult:
    """Train according to ``config``; ``resume`` = "auto" (newest checkpoint of the run, if any) or a path."""
    trainer = Trainer(config, resume)
    try:
        return trainer.run()
    finally:
        trainer.close()


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (so redirection and test capture see the lines)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_console_logging() -> None:
    if not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
