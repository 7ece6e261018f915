"""What the training loop evaluates, and when: validation loss (nats/token and bits/byte), HellaSwag, the
downstream suite and samples at their cadences.

Every rank takes part in the validation loss, HellaSwag and the suite (each scores its share, the results are
summed), and they run on the compiled model (the suite at one input length for all its tasks), so the numbers
are those of the model being trained and nothing recompiles.
Samples come from the uncompiled module on the main rank (KV-cached generation has a new shape every token).
"""

from __future__ import annotations

import logging
import time

import torch

from ..config import Config
from ..data.loader import val_batches
from ..device import autocast
from ..errors import UserError

log = logging.getLogger("gpt2forge.train")


class InLoopEvaluation:
    """The evaluations of one run; ``results(step)`` and ``samples(step)`` do what is due at ``step``, and tell
    ``timed(kind, seconds)`` how long each took (the ETA counts them). ``notes``: what setting them up found worth
    saying."""

    def __init__(self, config: Config, model: torch.nn.Module, train_model: torch.nn.Module, parallel,
                 autocast_dtype: torch.dtype | None, timed=lambda kind, seconds: None) -> None:
        self.config, self.model, self.train_model = config, model, train_model
        self.parallel, self.autocast_dtype, self.timed = parallel, autocast_dtype, timed
        self.notes: list[str] = []
        e, t = config.eval, config.train
        if e.val_every and 0 < e.val_tokens < t.seq_len:
            raise UserError(f"--eval.val_tokens={e.val_tokens} is less than one val sequence (train.seq_len="
                            f"{t.seq_len} tokens): raise it to at least {t.seq_len}, or 0 for the whole val split")
        batch = t.micro_batch_size * t.seq_len
        if e.val_every and 0 < e.val_tokens < batch:
            self.notes.append(f"eval.val_tokens={e.val_tokens} is less than one val batch (train.micro_batch_size × "
                              f"train.seq_len = {batch} tokens): each evaluation scores "
                              f"{e.val_tokens // t.seq_len * t.seq_len} tokens (whole sequences), in one padded batch")
        self.hellaswag = None
        if e.hellaswag_every:
            from ..eval.hellaswag import load_hellaswag

            self.hellaswag = load_hellaswag(e.hellaswag_file or None, limit=e.hellaswag_limit or None,
                                            flag="--eval.hellaswag_file")
        self.tasks = []
        if e.tasks_every:
            from ..eval.tasks import load_task, parse_task_names

            files = {"hellaswag": e.hellaswag_file} if e.hellaswag_file else {}
            self.tasks = [load_task(n, file=files.get(n), tasks_dir=e.tasks_dir or None, limit=e.tasks_limit or None,
                                    offline_hint=f"--eval.tasks_dir=DIR (holding {n}/ or {n}.jsonl)")
                          for n in parse_task_names(e.tasks, flag="eval.tasks")]

    def due(self, every: int, step: int) -> bool:
        """Whether a cadence of ``every`` steps (0 = never) falls on ``step`` or the last step of the run."""
        return bool(every) and (step % every == 0 or step == self.config.train.max_steps)

    def results(self, step: int) -> dict:
        """Validation loss (nats/token and bits/byte), HellaSwag and the suite (its CORE-style mean, a metrics
        column, and each task's accuracy, in the log and training_eval.json), where due (all ranks call this),
        with a progress bar on the main rank. ``val_tokens`` says how many tokens the loss was measured on (logged,
        not a metrics column)."""
        from ..eval.bpb import token_byte_lengths
        from ..eval.loss import evaluate_loss

        c, p, results = self.config, self.parallel, {}
        t0 = time.perf_counter()
        if self.due(c.eval.val_every, step):
            batches = val_batches(c.data.dir, c.train.micro_batch_size, c.train.seq_len, rank=p.rank,
                                  world_size=p.world_size, max_tokens=c.eval.val_tokens or None,
                                  vocab_size=c.model.vocab_size)
            out = evaluate_loss(self.train_model, batches, device=p.device, autocast_dtype=self.autocast_dtype,
                                world_size=p.world_size, progress=p.is_main, desc=f"step {step}: val loss",
                                token_bytes=token_byte_lengths())
            results["val_loss"], results["val_bpb"], results["val_tokens"] = out["loss"], out["bpb"], out["tokens"]
            self.timed("val", time.perf_counter() - t0)
        t0 = time.perf_counter()
        if self.hellaswag is not None and self.due(c.eval.hellaswag_every, step):
            from ..eval.hellaswag import evaluate_hellaswag

            out = evaluate_hellaswag(
                self.train_model, self.hellaswag, device=p.device, batch_size=c.train.micro_batch_size,
                autocast_dtype=self.autocast_dtype, block_size=self.model.config.block_size, rank=p.rank,
                world_size=p.world_size, progress=p.is_main,
            )
            results["hellaswag_acc"], results["hellaswag_acc_norm"] = out["acc"], out["acc_norm"]
            self.timed("hellaswag", time.perf_counter() - t0)
        t0 = time.perf_counter()
        if self.tasks and self.due(c.eval.tasks_every, step):
            from ..eval.tasks import evaluate_suite

            out = evaluate_suite(
                self.train_model, self.tasks, one_length=True, device=p.device, batch_size=c.train.micro_batch_size,
                autocast_dtype=self.autocast_dtype, block_size=self.model.config.block_size, rank=p.rank,
                world_size=p.world_size, progress=p.is_main,
            )
            results["core"] = out["core"]
            results.update({f"{name}_acc": r["accuracy"] for name, r in out["tasks"].items()})
            self.timed("tasks", time.perf_counter() - t0)
        return results

    def samples(self, step: int) -> list[str]:
        """Sampled continuations of the prompt, where due, on the main rank. Under FSDP the unwrapped module
        holds only a shard, so sampling is skipped."""
        c, p = self.config, self.parallel
        if not self.due(c.eval.sample_every, step) or not p.is_main or p.fsdp:
            return []
        from ..sample import generate_text
        from ..tokenizer import get_tokenizer

        t0, was_training = time.perf_counter(), self.model.training
        self.model.eval()
        with autocast(p.device, self.autocast_dtype):
            texts = generate_text(self.model, get_tokenizer(), c.eval.sample_prompt, num_samples=c.eval.num_samples,
                                  max_new_tokens=c.eval.sample_tokens, top_k=50, seed=c.train.seed + step)
        self.model.train(was_training)
        self.timed("samples", time.perf_counter() - t0)
        return texts
