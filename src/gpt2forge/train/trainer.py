"""The pretraining loop, from one CPU to many GPUs, resumable exactly: ``train(config, resume)``.

The loop is ours; Hugging Face ``accelerate`` supplies the process-group plumbing (``parallelize.py``). One
optimizer step: ``grad_accum`` micro-batches (no gradient all-reduce until the last), global gradient-norm
clipping, a check that loss and norm are finite (a non-finite step is skipped, never applied), the optimizers.
Around it, at their cadences: validation loss, HellaSwag, samples (``evaluation.py``), checkpoints. A
SIGTERM/SIGINT finishes the current step, saves and exits.

Everything that decides the next step is in the checkpoint (``checkpoint.py``: model, optimizers, loader
position, counters) or is a pure function of the step: the LR and momentum schedules, and the random state,
which is reseeded from (seed, step, rank) at every step, so a resumed run continues bit for bit.
Autocast is applied here rather than through accelerate's ``mixed_precision``, which would also upcast the
returned [B, T, V] logits to fp32 — gigabytes for nothing.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import runs
from ..config import Config, grad_accum_steps, to_toml
from ..data.loader import TokenLoader
from ..device import autocast, autocast_dtype, hardware_summary, library_versions, peak_flops
from ..errors import UserError
from ..files import atomic_write_text
from ..models import Runtime, build_model
from ..optim import build_optimizers
from ..weights import MODEL_FILE, read_model_config
from . import checkpoint as ckpt
from .evaluation import InLoopEvaluation
from .metrics import MetricsLogger, step_line, truncate_metrics
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


class Counters:
    """The trainer's own state: the step (which fixes the LR, momentum, data and random state), the training
    time over all launches, and the run of consecutive skipped steps."""

    def __init__(self, config: Config, world_size: int) -> None:
        self.config, self.world_size = config, world_size
        self.step, self.elapsed_s, self.bad_steps = 0, 0.0, 0

    def state_dict(self) -> dict:
        return {
            "step": self.step, "tokens": self.step * self.config.train.total_batch_tokens,
            "elapsed_s": self.elapsed_s, "bad_steps": self.bad_steps, "world_size": self.world_size,
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.elapsed_s = int(state["step"]), float(state.get("elapsed_s", 0.0))
        self.bad_steps = int(state.get("bad_steps", 0))


def seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed torch's RNG from (seed, step, rank): the random state is a function of the step, never stored."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1))


class Trainer:
    """Owns every piece of run state; ``run()`` trains to ``train.max_steps`` (or a given step) or until stopped."""

    def __init__(self, config: Config, resume: str | None = None) -> None:
        self.config = config
        self.parallel = start(config.train)
        self.check_device()
        self.grad_accum = grad_accum_steps(config, self.parallel.world_size)
        self.autocast_dtype = autocast_dtype(config.train.precision, self.parallel.device)
        if self.parallel.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = config.train.tf32
            torch.backends.cudnn.allow_tf32 = config.train.tf32
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
            ckpt.load_checkpoint(self.resume_from, self.pieces)
        self.setup_logging()

    @property
    def step(self) -> int:
        return self.counters.step

    # ---------------------------------------------------------------- setup
    def check_device(self) -> None:
        wanted, got = self.config.train.device, self.parallel.device
        if wanted not in ("auto", "cpu") and got.type != torch.device(wanted).type:
            raise UserError(f"train.device={wanted} requested, but accelerate placed this process on {got}")

    def setup_run_dir(self, resume: str | None) -> None:
        c, p = self.config, self.parallel
        self.run_dir = Path(c.log.out_dir) / (c.log.run_name or c.name or "run")
        if p.is_main:
            ckpt.remove_stale_temporaries(self.run_dir)
        p.barrier()
        existing = runs.complete_checkpoints(self.run_dir)
        if resume is None and existing:
            raise UserError(
                f"run directory {self.run_dir} already has checkpoints (newest: {existing[-1].name}); pass --resume "
                "to continue that run, or --log.run_name=NEW to start another"
            )
        self.resume_from = ckpt.find_resume_checkpoint(self.run_dir, resume) if resume is not None else None
        p.barrier()  # every rank has chosen before the main one moves anything
        if p.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.resume_from is not None:
                for moved in ckpt.supersede_newer(self.run_dir, self.resume_from):
                    log.warning("resuming from %s: the later checkpoint %s is set aside as %s",
                                self.resume_from.name, moved.name.removesuffix(".superseded"), moved)
        p.barrier()

    def setup_model(self) -> None:
        c, p = self.config, self.parallel
        torch.manual_seed(c.train.seed)
        self.model = build_model(c.model, Runtime(attention=c.train.attention)).to(p.device)  # the unwrapped module
        if self.resume_from is not None:
            self.check_architecture(self.resume_from)
        self.wrapped = p.wrap(self.model)
        self.optimizers = build_optimizers(self.model, c.optim, p.device.type, c.train.max_steps)
        self.train_model = compiled(self.wrapped, c.train.compile)
        self.flops_per_token = self.model.flops_per_token(c.train.seq_len)
        self.peak_flops = peak_flops(p.device)
        self.counters = Counters(c, p.world_size)
        self.launch_elapsed_s = 0.0  # training time of this launch (for the ETA)
        self.last_evals: dict = {}  # the newest evaluation results, saved with a checkpoint of the same step
        self.evaluation = InLoopEvaluation(c, self.model, self.train_model, p, self.autocast_dtype)

    def setup_data(self) -> None:
        c, p = self.config, self.parallel
        self.loader = TokenLoader(
            c.data.dir, c.train.micro_batch_size, c.train.seq_len, rank=p.rank, world_size=p.world_size,
            grad_accum=self.grad_accum, seed=c.train.seed, shuffle=c.data.shuffle,
        )

    def setup_logging(self) -> None:
        c, p = self.config, self.parallel
        self.metrics = None
        if not p.is_main:
            log.setLevel(logging.WARNING)  # one rank speaks; the others only warn
            return
        handler = logging.FileHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        self._log_handler = handler
        truncate_metrics(self.run_dir / runs.METRICS, before_step=self.step + 1)
        self.metrics = MetricsLogger(
            self.run_dir, trackers=c.log.trackers, project=c.log.project, run_name=self.run_dir.name,
            config=c.to_dict(),
        )
        atomic_write_text(self.run_dir / runs.RUN_CONFIG, to_toml(c))
        for warning in runs.append_launch(self.run_dir, {
            "command": sys.argv, "versions": library_versions(),
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            "world_size": p.world_size, "device": str(p.device), "hardware": hardware_summary(p.device),
        }):
            log.warning(warning)
        log.info(
            "run %s | %s params | %d rank(s) on %s | %s | batch %s tokens = %d × %d × %d ranks × %d accumulation | %s",
            self.run_dir, f"{self.model.num_params():,}", p.world_size, p.device,
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

    def save_checkpoint(self) -> Path | None:
        extra = {runs.RUN_CONFIG: to_toml(self.config)}
        if self.last_evals.get("step") == self.step:
            extra["training_eval.json"] = json_text(self.last_evals)
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.pieces, keep_last=self.config.checkpoint.keep_last,
                                    write=self.parallel.is_main, extra_files=extra)
        if path is not None:
            log.info("saved checkpoint %s", path)
        self.parallel.barrier()
        return path

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
        loss_value, norm_value = loss_sum.item(), float(grad_norm)
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if finite:
            self.optimizers.step()
            self.counters.bad_steps = 0
        else:
            self.counters.bad_steps += 1
        self.optimizers.zero_grad(set_to_none=True)
        self.counters.step += 1
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": norm_value, "finite": finite}

    # ---------------------------------------------------------------- the loop
    def log_row(self, row: dict) -> None:
        if self.metrics is not None:
            self.metrics.log(row)

    def run(self, until: int | None = None) -> TrainResult:
        """Train to ``until`` (default and at most ``train.max_steps``). Checkpoints fall on their cadence and at
        ``train.max_steps``; running to an earlier ``until`` (the benchmark's k steps) saves nothing extra."""
        c = self.config
        until = c.train.max_steps if until is None else min(until, c.train.max_steps)
        result = TrainResult(self.run_dir, self.step)
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
                self.check_finite(metrics)
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
        if not (self.step % c.log.every == 0 or self.step == c.train.max_steps or not metrics["finite"]):
            return
        tokens_per_s = c.train.total_batch_tokens / dt
        mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * p.world_size) if self.peak_flops else None
        row = {
            "step": self.step, "tokens": self.step * c.train.total_batch_tokens, "elapsed_s": self.counters.elapsed_s,
            "loss": metrics["loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"], "step_ms": 1000 * dt,
            "tokens_per_s": tokens_per_s, "mfu": mfu,
        }
        self.log_row(row)
        if p.is_main:
            steps_timed = self.step - first_step
            eta = (c.train.max_steps - self.step) * self.launch_elapsed_s / steps_timed if steps_timed > 1 else None
            log.info(step_line(row, c.train.max_steps, eta))

    def check_finite(self, metrics: dict) -> None:
        """Say that a non-finite step was skipped; stop the run after ``train.max_bad_steps`` in a row."""
        if metrics["finite"]:
            return
        bad = self.counters.bad_steps
        log.warning("step %d: non-finite loss %s or grad norm %s: step skipped, weights unchanged (%d in a row)",
                    self.step, metrics["loss"], metrics["grad_norm"], bad)
        if bad >= self.config.train.max_bad_steps:
            raise TrainingStopped(
                f"{bad} consecutive steps had a non-finite loss or gradient norm (last: step {self.step}); "
                "stopping. No bad update reached the weights. Lower optim.lr or raise optim.warmup_steps, then "
                f"resume from the last checkpoint in {self.run_dir}"
            )

    def log_evaluation(self) -> float | None:
        evals = self.evaluation.results(self.step)
        if not evals:
            return None
        self.last_evals = {"step": self.step, "tokens": self.step * self.config.train.total_batch_tokens, **evals}
        self.log_row(self.last_evals)
        if self.parallel.is_main:
            log.info("step %d | %s", self.step, " | ".join(f"{k} {v:.4f}" for k, v in evals.items()))
        return evals.get("val_loss")

    def stop_requested(self, stop: StopFlag) -> bool:
        """Agree across ranks, so that all of them save and leave at the same step."""
        if self.parallel.world_size == 1:
            return stop.requested
        flag = torch.tensor(float(stop.requested), device=self.parallel.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            log.removeHandler(self._log_handler)
            self._log_handler.close()


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
