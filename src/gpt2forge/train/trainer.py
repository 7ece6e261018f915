"""``gpt2forge train``: the pretraining loop, from one CPU to many GPUs, resumable exactly.

The loop is ours; Hugging Face ``accelerate`` supplies the plumbing (process group from ``torchrun`` /
``accelerate launch`` / plain ``python``, device placement, DDP wrapping). FSDP is PyTorch's FSDP2
(``fully_shard`` per block), not accelerate's FSDP plugin, which refuses to run without an accelerator and so
could not be tested on CPUs; the checkpoint code is the same for both through
``torch.distributed.checkpoint.state_dict``. Autocast is applied here
rather than through accelerate's ``mixed_precision``, which would also upcast the returned [B, T, V] logits
to fp32 — gigabytes for nothing.

One optimizer step: ``grad_accum`` micro-batches (no gradient all-reduce until the last), global gradient-norm
clipping, a check that loss and norm are finite (a non-finite step is skipped, never applied), AdamW. Around
it, at their cadences: validation loss, HellaSwag, samples, checkpoints. A SIGTERM/SIGINT finishes the current
step, saves and exits. Everything that decides the next step — weights, AdamW state, the loader position, the
step (the LR is a function of it), RNG states — is in the checkpoint, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Config, grad_accum_steps, load_config, to_toml
from ..data.loader import TokenLoader, val_batches
from ..device import hardware_summary, library_versions, peak_flops
from ..errors import UserError
from ..files import atomic_write_json, atomic_write_text
from ..model import GPT
from ..weights import MODEL_FILE, read_model_config, read_weights
from . import checkpoint as ckpt
from .metrics import MetricsLogger, format_duration, step_line, truncate_metrics
from .optim import build_optimizer, lr_at

log = logging.getLogger("gpt2forge.train")
ACCEPTS_OVERRIDES = True  # cli.py passes unknown --section.key=value options through as config overrides


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


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():  # auto
        return torch.bfloat16
    return None


class Trainer:
    """Owns every piece of run state; ``run()`` trains to ``train.max_steps`` or until stopped."""

    def __init__(self, config: Config, resume: str | None = None) -> None:
        self.config = config
        self.setup_distributed()
        self.setup_run_dir(resume)
        self.setup_model()
        self.setup_data()
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        self.setup_logging()

    # ---------------------------------------------------------------- setup
    def setup_distributed(self) -> None:
        from accelerate import Accelerator

        t = self.config.train
        # precision and compile are ours: never let `accelerate config` defaults (env vars set by
        # `accelerate launch`) add a second autocast or compile behind our back
        self.accelerator = Accelerator(cpu=t.device == "cpu", mixed_precision="no", dynamo_backend="no")
        self.device = self.accelerator.device
        if t.device not in ("auto", "cpu") and self.device.type != torch.device(t.device).type:
            raise UserError(f"train.device={t.device} requested, but accelerate placed this process on {self.device}")
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        if not self.is_main:
            log.setLevel(logging.WARNING)  # one rank speaks; the others only warn
        self.fsdp = t.distributed == "fsdp" and self.world_size > 1
        self.grad_accum = grad_accum_steps(self.config, self.world_size)
        self.autocast_dtype = _autocast_dtype(t.precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = t.tf32
            torch.backends.cudnn.allow_tf32 = t.tf32

    def setup_run_dir(self, resume: str | None) -> None:
        c = self.config
        self.run_dir = Path(c.log.out_dir) / (c.log.run_name or c.name or "run")
        if self.is_main:
            ckpt.remove_stale_temporaries(self.run_dir)
        self.accelerator.wait_for_everyone()
        existing = ckpt.complete_checkpoints(self.run_dir)
        if resume is None and existing:
            raise UserError(
                f"run directory {self.run_dir} already has checkpoints (newest: {existing[-1].name}); pass --resume "
                "to continue that run, or --log.run_name=NEW to start another"
            )
        self.resume_from = ckpt.find_resume_checkpoint(self.run_dir, resume) if resume is not None else None
        self.accelerator.wait_for_everyone()  # every rank has chosen before the main one moves anything
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.resume_from is not None:
                for moved in ckpt.supersede_newer(self.run_dir, self.resume_from):
                    log.warning("resuming from %s: the later checkpoint %s is set aside as %s",
                                self.resume_from.name, moved.name.removesuffix(".superseded"), moved)
        self.accelerator.wait_for_everyone()

    def setup_model(self) -> None:
        c = self.config
        torch.manual_seed(c.train.seed)
        self.model = GPT(c.model.gpt_config()).to(self.device)  # the unwrapped module: weights, sampling, export
        if self.resume_from is not None:
            self.check_architecture(self.resume_from)
        if self.fsdp:  # FSDP2: each block and then the rest (embeddings, tied lm_head) sharded across ranks
            from torch.distributed.fsdp import fully_shard

            # the logits are a slice (view) when the vocab is padded; nothing modifies them in place
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            for block in self.model.transformer.h:
                fully_shard(block)
            self.wrapped = fully_shard(self.model)
        else:
            self.wrapped = self.accelerator.prepare(self.model)  # DDP when distributed, the module itself otherwise
        self.optimizer = build_optimizer(self.wrapped, c.optim, self.device.type)
        self.train_model = torch.compile(self.wrapped) if c.train.compile else self.wrapped
        self.flops_per_token = self.model.flops_per_token(c.train.seq_len)
        self.peak_flops = peak_flops(self.device)
        self.step = 0
        self.elapsed_s = 0.0  # training time over all launches (logged as elapsed_s)
        self.launch_elapsed_s = 0.0  # training time of this launch (for the ETA)
        self.bad_steps = 0
        self.last_evals: dict = {}  # the newest evaluation results, saved with a checkpoint of the same step

    def setup_data(self) -> None:
        c = self.config
        self.loader = TokenLoader(
            c.data.dir, c.train.micro_batch_size, c.train.seq_len, rank=self.rank, world_size=self.world_size,
            grad_accum=self.grad_accum, seed=c.train.seed, shuffle=c.data.shuffle,
        )
        self.hellaswag = None
        if c.eval.hellaswag_every:
            from ..eval.hellaswag import load_hellaswag

            self.hellaswag = load_hellaswag(c.eval.hellaswag_file or None, limit=c.eval.hellaswag_limit or None)

    def setup_logging(self) -> None:
        c = self.config
        if not self.is_main:
            self.metrics = None
            return
        handler = logging.FileHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        self._log_handler = handler
        truncate_metrics(self.run_dir / "metrics.csv", before_step=self.step + 1)
        self.metrics = MetricsLogger(
            self.run_dir, tensorboard=c.log.tensorboard, wandb=c.log.wandb, wandb_project=c.log.wandb_project,
            run_name=self.run_dir.name, config=c.to_dict(),
        )
        atomic_write_text(self.run_dir / "config.toml", to_toml(c))
        record_path = self.run_dir / "run.json"
        try:
            record = json.loads(record_path.read_text()) if record_path.is_file() else {"launches": []}
        except json.JSONDecodeError:
            log.warning("%s is unreadable; starting a new record of launches", record_path)
            record = {"launches": []}
        record["launches"].append({
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
            "versions": library_versions(),
            "resumed_from": str(self.resume_from) if self.resume_from else None,
            "world_size": self.world_size,
            "device": str(self.device),
            "hardware": hardware_summary(self.device),
        })
        atomic_write_json(record_path, record)
        n_params = self.model.num_params()
        log.info(
            "run %s | %s params | %d rank(s) on %s | %s | batch %s tokens = %d × %d × %d ranks × %d accumulation | %s",
            self.run_dir, f"{n_params:,}", self.world_size, self.device,
            {None: "fp32", torch.bfloat16: "bf16 autocast"}[self.autocast_dtype], f"{c.train.total_batch_tokens:,}",
            c.train.micro_batch_size, c.train.seq_len, self.world_size, self.grad_accum,
            f"resuming from {self.resume_from} at step {self.step}" if self.resume_from else "fresh start",
        )

    # ---------------------------------------------------------------- checkpoints
    def check_architecture(self, checkpoint: Path) -> None:
        stored = read_model_config(checkpoint / MODEL_FILE)
        mine = self.model.config
        if stored is None or {**stored.to_dict(), "attention": mine.attention} != mine.to_dict():
            raise UserError(
                f"{checkpoint} holds a different architecture ({stored}) than this run's model ({mine}); "
                "resume with the same model settings"
            )

    def load_checkpoint(self, checkpoint: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
        )
        state = ckpt.read_train_state(checkpoint)
        if state.get("world_size") != self.world_size:
            raise UserError(
                f"{checkpoint} was saved by {state.get('world_size')} rank(s); this run has {self.world_size}. "
                "Resume with the same number of processes (the data order depends on it)"
            )
        self.loader.load_state_dict(state["loader"])
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.wrapped, read_weights(checkpoint / MODEL_FILE), options=options)
        optim_state = ckpt.read_optimizer_state(checkpoint, map_location="cpu")
        set_optimizer_state_dict(self.wrapped, self.optimizer, optim_state_dict=optim_state, options=options)
        rng = ckpt.read_rng_states(checkpoint)
        ckpt.restore_rng_state(rng[self.rank])
        self.step = int(state["step"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.bad_steps = int(state.get("bad_steps", 0))

    def save_checkpoint(self) -> Path | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.wrapped, options=options)
        optim_state = get_optimizer_state_dict(self.wrapped, self.optimizer, options=options)
        rng_states = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(rng_states, ckpt.capture_rng_state())
        else:
            rng_states = [ckpt.capture_rng_state()]
        path = None
        if self.is_main:
            train_state = {
                "step": self.step,
                "tokens": self.step * self.config.train.total_batch_tokens,
                "loader": self.loader.state_dict(),
                "world_size": self.world_size,
                "elapsed_s": self.elapsed_s,
                "bad_steps": self.bad_steps,
                "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            evals = self.last_evals if self.last_evals.get("step") == self.step else None
            checkpoint = ckpt.Checkpoint(model_state, self.model.config, optim_state, train_state, rng_states,
                                         to_toml(self.config), evals)
            path = ckpt.save_checkpoint(self.run_dir, self.step, checkpoint, self.config.checkpoint.keep_last)
            log.info("saved checkpoint %s", path)
        self.accelerator.wait_for_everyone()
        return path

    # ---------------------------------------------------------------- the step
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def gradient_sync(self, sync: bool):
        """Skip the gradient all-reduce on accumulation micro-steps: only the last one of a step syncs."""
        if sync or self.world_size == 1:
            yield
        elif self.fsdp:
            self.wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.wrapped.set_requires_gradient_sync(True)
        else:
            with self.accelerator.no_sync(self.wrapped):
                yield

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
        c = self.config
        lr = lr_at(self.step, c.optim, c.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = self.loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.gradient_sync(micro == self.grad_accum - 1):
                with self.autocast():
                    _, loss = self.train_model(x, y)
                loss = loss / self.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        if self.world_size > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), c.optim.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a sharded (DTensor) norm
            grad_norm = grad_norm.full_tensor()
        loss_value, norm_value = loss_sum.item(), float(grad_norm)
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if finite:
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": norm_value, "finite": finite}

    # ---------------------------------------------------------------- evaluation
    def due(self, every: int) -> bool:
        """Whether a cadence of ``every`` steps (0 = never) falls on the current step or the last one."""
        return bool(every) and (self.step % every == 0 or self.step == self.config.train.max_steps)

    def evaluate(self) -> dict:
        """Validation loss and HellaSwag at their cadence (all ranks take part; the compiled model is used)."""
        from ..eval.loss import evaluate_loss

        c, results = self.config, {}
        self.wrapped.eval()
        if self.due(c.eval.val_every):
            batches = val_batches(c.data.dir, c.train.micro_batch_size, c.train.seq_len, rank=self.rank,
                                  world_size=self.world_size, max_tokens=c.eval.val_tokens or None)
            out = evaluate_loss(self.train_model, batches, device=self.device, autocast_dtype=self.autocast_dtype,
                                world_size=self.world_size)
            results["val_loss"] = out["loss"]
        if self.due(c.eval.hellaswag_every) and self.hellaswag is not None:
            from ..eval.hellaswag import evaluate_hellaswag

            out = evaluate_hellaswag(
                self.train_model, self.hellaswag, device=self.device, batch_size=c.train.micro_batch_size,
                autocast_dtype=self.autocast_dtype, block_size=self.model.config.block_size, rank=self.rank,
                world_size=self.world_size, progress=False,
            )
            results["hellaswag_acc"], results["hellaswag_acc_norm"] = out["acc"], out["acc_norm"]
        self.wrapped.train()
        return results

    def sample(self) -> None:
        """Print samples from the unwrapped model (KV-cached generation has a new shape every token, so it is
        not compiled). Under FSDP the unwrapped module holds only a shard, so sampling is skipped."""
        c = self.config
        if not self.due(c.eval.sample_every) or not self.is_main or self.fsdp:
            return
        from ..sample import generate_text
        from ..tokenizer import get_tokenizer

        self.model.eval()
        with self.autocast():
            texts = generate_text(self.model, get_tokenizer(), c.eval.sample_prompt, num_samples=c.eval.num_samples,
                                  max_new_tokens=c.eval.sample_tokens, top_k=50, seed=c.train.seed + self.step)
        self.model.train()
        for i, text in enumerate(texts):
            log.info("sample %d: %s", i, (c.eval.sample_prompt + text).replace("\n", "\\n"))

    # ---------------------------------------------------------------- the loop
    def log_row(self, row: dict) -> None:
        if self.metrics is not None:
            self.metrics.log(row)

    def run(self) -> TrainResult:
        c = self.config
        result = TrainResult(self.run_dir, self.step)
        self.wrapped.train()
        with StopFlag() as stop:
            if self.step == 0:  # the untrained model's numbers anchor the curves
                result.val_loss = self.log_evaluation()
            while self.step < c.train.max_steps:
                t0 = time.perf_counter()
                metrics = self.train_step()
                dt = time.perf_counter() - t0
                self.elapsed_s += dt
                self.launch_elapsed_s += dt
                result.losses[self.step] = metrics["loss"]
                self.log_step(metrics, dt, first_step=result.step)
                self.check_finite(metrics)
                val = self.log_evaluation()
                result.val_loss = val if val is not None else result.val_loss
                self.sample()
                stop_now = self.stop_requested(stop)
                if stop_now or self.due(c.checkpoint.every) or self.step == c.train.max_steps:
                    self.save_checkpoint()
                if stop_now:
                    result.stopped_by_signal = True
                    log.info("stopped at step %d; resume with --resume", self.step)
                    break
        result.step, result.elapsed_s = self.step, self.elapsed_s
        return result

    def log_step(self, metrics: dict, dt: float, first_step: int) -> None:
        """Console and metrics line of a step (every ``log.every`` steps, the last one, and any skipped one)."""
        c = self.config
        if not (self.step % c.log.every == 0 or self.step == c.train.max_steps or not metrics["finite"]):
            return
        tokens_per_s = c.train.total_batch_tokens / dt
        mfu = self.flops_per_token * tokens_per_s / (self.peak_flops * self.world_size) if self.peak_flops else None
        row = {
            "step": self.step, "tokens": self.step * c.train.total_batch_tokens, "elapsed_s": self.elapsed_s,
            "loss": metrics["loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"], "step_ms": 1000 * dt,
            "tokens_per_s": tokens_per_s, "mfu": mfu,
        }
        self.log_row(row)
        if self.is_main:
            steps_timed = self.step - first_step
            eta = (c.train.max_steps - self.step) * self.launch_elapsed_s / steps_timed if steps_timed > 1 else None
            log.info(step_line(row, c.train.max_steps, eta))

    def check_finite(self, metrics: dict) -> None:
        """Say that a non-finite step was skipped; stop the run after ``train.max_bad_steps`` in a row."""
        if metrics["finite"]:
            return
        log.warning("step %d: non-finite loss %s or grad norm %s: step skipped, weights unchanged (%d in a row)",
                    self.step, metrics["loss"], metrics["grad_norm"], self.bad_steps)
        if self.bad_steps >= self.config.train.max_bad_steps:
            raise TrainingStopped(
                f"{self.bad_steps} consecutive steps had a non-finite loss or gradient norm (last: step {self.step}); "
                "stopping. No bad update reached the weights. Lower optim.lr or raise optim.warmup_steps, then "
                f"resume from the last checkpoint in {self.run_dir}"
            )

    def log_evaluation(self) -> float | None:
        evals = self.evaluate()
        if not evals:
            return None
        self.last_evals = {"step": self.step, "tokens": self.step * self.config.train.total_batch_tokens, **evals}
        self.log_row(self.last_evals)
        if self.is_main:
            log.info("step %d | %s", self.step, " | ".join(f"{k} {v:.4f}" for k, v in evals.items()))
        return evals.get("val_loss")

    def stop_requested(self, stop: StopFlag) -> bool:
        """Agree across ranks, so that all of them save and leave at the same step."""
        if self.world_size == 1:
            return stop.requested
        flag = torch.tensor(float(stop.requested), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            log.removeHandler(self._log_handler)
            self._log_handler.close()


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None,
                        help="recipe: a shipped name (quickstart, gpt2-124m-fineweb-edu-10b, …) or a TOML file")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="continue a run: alone, from the newest complete checkpoint of the run directory "
                             "(or start fresh if it has none); or from the given checkpoint / run directory")
    parser.epilog = ("Any config field can be overridden: --section.key=value, e.g. --optim.lr=3e-4 "
                     "--train.max_steps=100 --data.dir=data/x. Sections: model, data, optim, train, eval, checkpoint, log.")


def run(args: argparse.Namespace) -> None:
    setup_console_logging()
    config = load_config(args.config, args.overrides)
    if args.config is None:
        log.info("no --config given: using the defaults (the GPT-2 124M FineWeb-Edu recipe)")
    result = train(config, args.resume)
    if not result.stopped_by_signal:
        log.info("done: %d steps, %s of training; run directory %s", result.step, format_duration(result.elapsed_s), result.run_dir)
