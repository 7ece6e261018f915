"""The pretraining loop, from one CPU to many GPUs, resumable exactly: ``train(config, resume)``.

An orchestrator: each concern has its own home, and this file puts them in order.
- ``parallelize.py``: the process group (accelerate), the device checks, DDP/FSDP2, compile, main-rank decisions;
- ``rundir.py``: the run directory's lock, the resume decision, its claim and records;
- ``guard.py``: which steps reach the weights, and when the run is in trouble (no checkpoint then);
- ``checkpoint.py``: a checkpoint is a dict of stateful pieces (model, optimizers, loader, counters, guard);
- ``optim/schedules.py``: the LR as a pure function of the step, and the resume-time check of its settings;
- ``evaluation.py``, ``metrics.py``, ``logs.py``, ``eta.py``: what is measured and where it is written;
- ``signals.py`` (SIGTERM/SIGINT), ``memory_estimate.py`` (memory per rank before the first step, and what to say
  when a step does not fit in the GPU); ``slurm.py`` (a group from srun's variables).

One optimizer step: ``grad_accum`` micro-batches (no gradient all-reduce until the last; each micro-step's logits
are dropped before the next forward), global gradient-norm clipping (no norm at all when ``optim.grad_clip`` is
0), then ONE host sync that reads the loss, the norm, the finiteness of the weights after the previous update
and (with several ranks) the stop flags together; the guard judges the step, and the optimizers run only if it
passes. A checkpoint is written on its cadence only from a healthy state (``save``). A SIGTERM/SIGINT finishes
the current step, saves and exits. The random state is reseeded from (seed, step, rank) at every step, so a
resumed run continues bit for bit. Autocast is applied here rather than through accelerate's ``mixed_precision``,
which would also upcast the returned [B, T, V] logits to fp32 — gigabytes for nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import dist, runs
from ..config import Config, grad_accum_steps
from ..data.loader import TokenLoader
from ..device import autocast, autocast_dtype, hardware_summary, library_versions, peak_flops, restore_tf32, set_tf32
from ..errors import UserError
from ..files import explain
from ..models import Runtime, build_model, padding_params
from ..optim import build_optimizers
from . import checkpoint as ckpt
from .eta import Eta
from .evaluation import InLoopEvaluation
from .guard import StepGuard, poisoned_message, stop_advice, weights_norm
from .logs import close_run_log, open_run_log, setup_console_logging  # noqa: F401 -- setup_*: the commands' import
from .memory_estimate import explain_out_of_memory, memory_summary
from .metrics import MetricsLogger, llmc_flops_per_token, mfu, step_line, truncate_metrics
from .parallelize import compiled, launch, on_main
from .rundir import RunDir, saved_config, schedule_in_config
from .signals import StopFlag

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


def seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed torch's RNG from (seed, step, rank): the random state is a function of the step, never stored."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1))


class Trainer:
    """Owns every piece of run state; ``run()`` trains to ``train.max_steps`` (or a given step) or until stopped.
    ``close()`` releases the run directory (also when the constructor fails). ``argv``: the command line after
    ``gpt2forge``, for the run record and the resume hints."""

    def __init__(self, config: Config, resume: str | None = None, argv: list[str] | None = None) -> None:
        self.config = config
        self.rundir = RunDir(config, argv)
        self.run_dir = self.rundir.path
        self.metrics, self._log_handler, self.io_error, self.stop, self.agreed_stop = None, None, None, None, None
        self.tf32_before = None
        self.parallel = launch(config.train)
        try:
            p = self.parallel
            self.grad_accum = grad_accum_steps(config, p.world_size)
            self.autocast_dtype = autocast_dtype(config.train.precision, p.device)
            if p.device.type == "cuda":  # restored by close()
                self.tf32_before = set_tf32(config.train.tf32)
            chosen = on_main(lambda: self.rundir.choose(resume))
            self.resume_from = None if chosen is None else Path(chosen)
            self.setup_model()
            self.loader = TokenLoader(
                config.data.dir, config.train.micro_batch_size, config.train.seq_len, rank=p.rank,
                world_size=p.world_size, grad_accum=self.grad_accum, seed=config.train.seed,
                shuffle=config.data.shuffle, vocab_size=config.model.vocab_size, pin_memory=p.device.type == "cuda",
            )
            self.pieces: dict[str, ckpt.Piece] = {  # file name in the checkpoint: what is saved there
                ckpt.MODEL_FILE: ckpt.ModelPiece(self.wrapped, self.model.config),
                ckpt.OPTIMIZER_FILE: ckpt.OptimizersPiece(self.wrapped, self.optimizers),
                ckpt.LOADER_FILE: self.loader,
                runs.TRAIN_STATE: self.counters,
                ckpt.GUARD_FILE: self.guard,
            }
            self.checkpoints = ckpt.Checkpoints(self.run_dir, self.pieces,
                                                ckpt.resolve_format(config.checkpoint.format, p.fsdp),
                                                config.checkpoint.keep_last, newest=self.resume_from)
            if self.resume_from is not None:
                self.counters.legacy_schedule = schedule_in_config(self.resume_from)
                self.checkpoints.load(self.resume_from)  # verified when it was chosen
                if not self.weights_finite():
                    raise UserError(f"{self.resume_from} holds non-finite weights (a version that did not check them "
                                    "saved it): resume from an earlier checkpoint with --resume PATH")
                self.rundir.notes += [self.counters.note] if self.counters.note else []
            on_main(lambda: self.rundir.claim(self.resume_from))
            if not p.is_main:
                log.setLevel(logging.WARNING)  # one rank speaks; the others only warn
            on_main(self.open_run_files)
        except BaseException:
            self.close()
            raise

    @property
    def step(self) -> int:
        return self.counters.step

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest healthy checkpoint, once written whole (a save in flight does not count yet)."""
        return self.checkpoints.newest

    # ---------------------------------------------------------------- setup
    def setup_model(self) -> None:
        c, p = self.config, self.parallel
        torch.manual_seed(c.train.seed)
        runtime = Runtime(attention=c.train.attention, loss=c.train.loss)
        self.model = build_model(c.model, runtime).to(p.device)  # the unwrapped module: weights, sampling, export
        if self.resume_from is not None:
            ckpt.check_architecture(self.resume_from, self.model.config)
        self.wrapped = p.wrap(self.model)
        self.optimizers = build_optimizers(self.model, c.optim, p.device.type, c.train.max_steps)
        self.train_model = compiled(self.wrapped, c.train.compile)
        self.flops_per_token = self.model.flops_per_token(c.train.seq_len)
        self.llmc_flops_per_token = llmc_flops_per_token(self.model, c.train.seq_len)  # MFU as llm.c counts it
        self.peak_flops = peak_flops(p.device)
        self.counters = ckpt.Counters(c, p.world_size)
        self.guard = StepGuard(c.train, c.model.vocab_size)
        self.pending_weights: torch.Tensor | None = None  # the weights' norm after the last update, not yet read
        self.last_step: dict = {}  # the previous step's numbers, for the message when its update broke the weights
        self.last_evals: dict = {}  # the newest evaluation results, saved with a checkpoint of the same step
        self.save_postponed = False
        e, every = c.eval, c.checkpoint.every
        self.eta = Eta(c.train.max_steps, {"val": (e.val_every, False), "hellaswag": (e.hellaswag_every, False),
                                           "tasks": (e.tasks_every, False), "samples": (e.sample_every, False),
                                           "checkpoint": (every, True)})
        self.evaluation = InLoopEvaluation(c, self.model, self.train_model, p, self.autocast_dtype, self.eta.add)

    def open_run_files(self) -> None:
        c, p = self.config, self.parallel
        self._log_handler = open_run_log(self.run_dir)
        truncate_metrics(self.run_dir / runs.METRICS, before_step=self.step + 1 if self.resume_from else 0)
        self.metrics = MetricsLogger(self.run_dir, trackers=c.log.trackers, project=c.log.project,
                                     run_name=self.run_dir.name, run_id=self.rundir.tracker_id(), config=c.to_dict())
        for note in self.rundir.notes + self.evaluation.notes:
            log.warning(note)
        for warning in self.rundir.record_launch({
            "versions": library_versions(), "resumed_from": str(self.resume_from) if self.resume_from else None,
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
        log.info(memory_summary(c, p.world_size, self.autocast_dtype is not None, p.device))

    # ---------------------------------------------------------------- the step
    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics (``grad_norm`` None when
        ``optim.grad_clip`` is 0: no norm is computed)."""
        c, p = self.config, self.parallel
        seed_step(c.train.seed, self.step, p.rank)
        lr = self.optimizers.set_step(self.step)
        loss_sum = torch.zeros((), device=p.device)
        for micro in range(self.grad_accum):
            x, y = self.loader.next_batch()
            x, y = x.to(p.device, non_blocking=True), y.to(p.device, non_blocking=True)
            with p.gradient_sync(self.wrapped, micro == self.grad_accum - 1):
                with autocast(p.device, self.autocast_dtype):
                    loss = self.train_model(x, y)[1]  # the logits die here, not at the next forward
                loss = loss / self.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        norm = None
        if c.optim.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), c.optim.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a sharded (DTensor) norm
        loss_value, norm_value = self.read_step(loss_sum, norm)
        reason = self.guard.judge(loss_value, norm_value)  # the same numbers on every rank: all decide alike
        if reason is None:
            self.optimizers.step()
            self.pending_weights = weights_norm(self.model, p.fsdp)
        self.guard.record(self.step + 1, loss_value, norm_value, reason)
        self.optimizers.zero_grad(set_to_none=True)
        self.counters.step += 1
        self.last_step = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": norm_value, "skipped": reason}
        return self.last_step

    def read_step(self, loss_sum: torch.Tensor, norm: torch.Tensor | None) -> tuple[float, float | None]:
        """The step's one host sync: the loss (averaged over ranks), the gradient norm, the weights' norm after the
        previous update and, with several ranks, the stop flags (agreed in the same collective). The batches are
        prefetched and, on CUDA, pinned, so nothing before this waits for the device."""
        p, parts = self.parallel, [loss_sum.float().reshape(1)]
        if p.world_size > 1:
            flags = [float(self.stop is not None and self.stop.requested), float(self.io_failure() is not None)]
            parts = [dist.all_reduce(torch.stack([parts[0][0], *(torch.full((), f, device=p.device) for f in flags)]),
                                     "avg")]
        parts += [t.float().reshape(1) for t in (norm, self.pending_weights) if t is not None]
        values = torch.cat(parts).tolist()
        loss_value, flags = values[0], values[1:3] if p.world_size > 1 else []
        norm_value = values[1 + len(flags)] if norm is not None else None
        self.agreed_stop = [bool(f) for f in flags] or None
        if self.pending_weights is not None:
            self.pending_weights = None
            if not math.isfinite(values[-1]):
                raise TrainingStopped(poisoned_message(self.step, self.last_step, self.advice()))
        return loss_value, norm_value

    def weights_finite(self) -> bool:
        """Whether every weight is finite now (one host sync)."""
        self.pending_weights = None
        return math.isfinite(weights_norm(self.model, self.parallel.fsdp).item())

    # ---------------------------------------------------------------- the loop
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
        bf16, p = self.autocast_dtype is not None, self.parallel
        with StopFlag() as self.stop, explain_out_of_memory(c, p.world_size, bf16, p.device, lambda: self.step):
            if self.step == 0:  # the untrained model's numbers anchor the curves
                result.val_loss = self.log_evaluation()
            while self.step < until:
                t0 = time.perf_counter()
                metrics = self.train_step()
                dt = time.perf_counter() - t0
                self.counters.elapsed_s += dt
                self.eta.add("step", dt)
                result.losses[self.step] = metrics["loss"]
                self.log_step(metrics, dt)
                self.check_step(metrics)
                val = self.log_evaluation()
                result.val_loss = val if val is not None else result.val_loss
                for i, text in enumerate(self.evaluation.samples(self.step)):
                    log.info("sample %d: %s", i, (c.eval.sample_prompt + text).replace("\n", "\\n"))
                stop_now = self.stop_requested()
                if (stop_now or self.save_postponed or self.evaluation.due(c.checkpoint.every, self.step)
                        or self.step == c.train.max_steps):
                    self.save(final=stop_now or self.step == c.train.max_steps)
                if stop_now:
                    result.stopped_by_signal = True
                    break
            self.finish_saving()  # a checkpoint still being written in the background
            if result.stopped_by_signal:
                log.info("stopped at step %d; resume with --resume", self.step)
        result.step, result.elapsed_s = self.step, self.counters.elapsed_s
        return result

    def log_row(self, row: dict) -> None:
        if self.metrics is None or self.io_error is not None:
            return
        try:
            self.metrics.log(row)
        except OSError as e:
            self.io_error = explain(e, self.metrics.path)

    def log_step(self, metrics: dict, dt: float) -> None:
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
            log.info(step_line(row, c.train.max_steps, self.eta.seconds_left(self.step)))

    def check_step(self, metrics: dict) -> None:
        """Say that a step was skipped, and stop the run after ``train.max_bad_steps`` in a row. Nothing is saved
        on such a stop: the newest checkpoint stays the last word on the run."""
        if metrics["skipped"]:
            log.warning(self.guard.skipped_line(self.step, metrics["skipped"]))
        if self.guard.stop_due:
            raise TrainingStopped(f"{self.guard.bad_steps_what(self.step)}. {self.advice()}")

    def advice(self) -> str:
        self.checkpoints.finish_or_warn()  # the advice names the newest checkpoint: one still being written first
        return stop_advice(self.last_checkpoint, self.rundir.resume_command, self.config.optim)

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

    def io_failure(self) -> str | None:
        return self.io_error or (self._log_handler.error if self._log_handler is not None else None)

    def stop_requested(self) -> bool:
        """Whether to save and leave now. One process reads its flags; several agreed on them in the step's sync
        (so all save and leave at the same step). A log the main rank cannot write (a full disk) stops every rank."""
        if self.parallel.world_size == 1:
            requested, failed = self.stop.requested, self.io_failure() is not None
        else:
            requested, failed = self.agreed_stop or (False, False)
        if failed:
            raise TrainingStopped(
                f"cannot write the run's logs: {self.io_failure() or 'see the main process'}. The run stopped at step "
                f"{self.step} without saving (that would fail too); {self.newest_checkpoint_clause()}. Fix the cause, "
                "then run the same command with --resume"
            )
        return requested

    # ---------------------------------------------------------------- checkpoints
    def probe(self) -> tuple[bool, float]:
        """Whether the weights about to be saved are finite, and their loss on this rank's first micro-batch of the
        next step (averaged over ranks), in one host sync: an update that broke the weights shows here before a
        checkpoint can hold them."""
        p = self.parallel
        x, y = (t.to(p.device) for t in self.loader.batch(self.step))
        with torch.no_grad(), autocast(p.device, self.autocast_dtype):
            loss = dist.all_reduce(self.wrapped(x, y)[1].float(), "avg")
        self.pending_weights = None
        weights, loss = torch.stack([weights_norm(self.model, p.fsdp), loss]).tolist()
        return math.isfinite(weights), loss

    def save(self, final: bool) -> None:
        """Write the due checkpoint if the run is healthy: finite weights (else stop at once), and the guard
        neither in trouble nor alarmed by the weights' loss on the next batch. Otherwise the save waits for a
        healthy step; at the end of the run (``final``) it cannot wait: the run stops with the guard's message."""
        t0 = time.perf_counter()
        finite, loss = self.probe()
        if not finite:
            raise TrainingStopped(poisoned_message(self.step, self.last_step, self.advice()))
        reason = self.guard.judge(loss, None, absolute_only=True)
        if reason is not None:
            self.guard.trouble(self.step, f"the weights after it score {reason} on the next batch")
        if self.guard.in_trouble(self.step):
            if final:
                why = "the run reached train.max_steps" if self.step == self.config.train.max_steps else "stopped"
                raise TrainingStopped(f"{self.guard.trouble_what(self.step, why)}. {self.advice()}")
            if not self.save_postponed:
                log.warning("step %d: checkpoint postponed while the run is in trouble (step %d: %s)", self.step,
                            self.guard.last_bad_step, self.guard.last_reason)
            self.save_postponed = True
            return
        self.save_postponed = False
        self.save_checkpoint(checked=True)
        self.eta.add("checkpoint", time.perf_counter() - t0)

    def save_checkpoint(self, checked: bool = False) -> None:
        """Save the step's checkpoint (all ranks take part; ``checked``: the weights were just found finite); a
        sharded one is written in the background (``finish_saving``). A failed save stops the run on every rank:
        going on without checkpoints would put days of work at risk."""
        if not checked and not self.weights_finite():
            raise TrainingStopped(poisoned_message(self.step, None, self.advice()))
        extra = {runs.RUN_CONFIG: saved_config(self.config)}
        if self.last_evals.get("step") == self.step:
            extra["training_eval.json"] = json.dumps(self.last_evals, indent=2) + "\n"
        with self.saving():
            self.checkpoints.save(self.step, extra)

    def finish_saving(self) -> None:
        with self.saving():
            self.checkpoints.finish()

    @contextlib.contextmanager
    def saving(self):
        try:
            yield
        except ckpt.CheckpointSaveError as e:
            raise TrainingStopped(f"{e}. The run stopped at step {self.step} rather than train on without "
                                  f"checkpoints; {self.newest_checkpoint_clause()}. Fix the cause (free space?), then "
                                  "run the same command with --resume to continue from there") from None

    def newest_checkpoint_clause(self) -> str:
        c = self.last_checkpoint
        return f"the newest checkpoint, {c} (step {runs.checkpoint_step(c)}), is intact" if c else \
            "no checkpoint of this run had been saved yet"

    def close(self) -> None:
        """Close the run's files and release its directory (safe to call more than once). A checkpoint still being
        written is finished first: it was saved from a healthy state."""
        if getattr(self, "checkpoints", None) is not None:
            self.checkpoints.finish_or_warn()
            self.checkpoints.close()
        if getattr(self, "loader", None) is not None:
            self.loader.close()
        if self.metrics is not None:
            try:
                self.metrics.close()
            except OSError:
                pass
            self.metrics = None
        close_run_log(self._log_handler)
        self._log_handler = None
        self.rundir.release()
        if self.tf32_before is not None:
            restore_tf32(self.tf32_before)
            self.tf32_before = None


def train(config: Config, resume: str | None = None, argv: list[str] | None = None) -> TrainResult:
    """Train according to ``config``; ``resume`` = "auto" (newest checkpoint of the run, if any) or a path;
    ``argv``: the command line after ``gpt2forge`` (for the run record and the resume hints)."""
    trainer = Trainer(config, resume, argv)
    try:
        return trainer.run()
    finally:
        trainer.close()
