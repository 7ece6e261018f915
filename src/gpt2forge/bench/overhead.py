"""Trainer overhead: the real ``Trainer.run`` loop against a bare forward/backward/step loop.

Same model, optimizer and tokens; blocks of steps alternate (trainer-bare, bare-trainer, …) so that drifting
foreign load cancels, and the overhead is the median over quiet rounds of the ratio of neighbouring blocks.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
from functools import partial
from pathlib import Path

import torch

from ..device import autocast
from .measure import bare_step, is_quiet, spread, timed
from .options import TARGET_OVERHEAD_PCT, BenchOptions

log = logging.getLogger("gpt2forge.bench")


@contextlib.contextmanager
def quiet_train_log():
    """The Trainer logs every step at INFO to train.log, as in a real run; keep its lines off the console."""
    train_log = logging.getLogger("gpt2forge.train")
    before = train_log.level, train_log.propagate
    train_log.setLevel(logging.INFO)
    train_log.propagate = False
    try:
        yield
    finally:
        train_log.setLevel(before[0])
        train_log.propagate = before[1]


def overhead_config(opts: BenchOptions, device: torch.device, data_dir: Path, out_dir: Path):
    from ..config import load_config

    cuda = device.type == "cuda"
    settings = {
        "model.preset": opts.preset, "data.dir": data_dir, "log.out_dir": out_dir, "log.run_name": "overhead",
        "train.micro_batch_size": opts.batch_size, "train.seq_len": opts.seq_len,
        "train.total_batch_tokens": opts.batch_size * opts.seq_len, "train.max_steps": 1_000_000,
        "train.device": device.type, "train.precision": "auto" if cuda else "fp32",
        "train.compile": cuda and not opts.quick,  # CPU: as the quickstart recipe (compiling costs more than it saves)
        "optim.warmup_steps": 10, "optim.decay_steps": 10_000,  # a schedule that does not move with max_steps
        "eval.val_every": 0, "eval.hellaswag_every": 0, "eval.sample_every": 0, "checkpoint.every": 0, "log.every": 1,
    }
    return load_config(None, [f"--{k}={v}" for k, v in settings.items()])


def run_overhead(opts: BenchOptions, device: torch.device, data_dir: Path, work_dir: Path) -> dict:
    """Trainer.run vs a bare loop on the same model, optimizer and batches, in alternating blocks (ABBA)."""
    from ..train.trainer import Trainer

    config = overhead_config(opts, device, data_dir, work_dir)
    rounds, k = 2 * opts.repeats, opts.steps
    with quiet_train_log():
        trainer = Trainer(config)
        try:
            def trainer_block() -> None:  # k steps of the real loop (max_steps is far away: no final checkpoint)
                trainer.run(until=trainer.step + k)

            def trainer_autocast():
                return autocast(trainer.parallel.device, trainer.autocast_dtype)

            def bare_block(batches) -> None:
                for x, y in batches:
                    bare_step(trainer.wrapped, trainer.train_model, trainer.optimizers, x, y, trainer_autocast,
                              config.optim.grad_clip)

            def replay() -> list:  # the batches of the trainer's last block, on the device before timing starts
                steps = range(trainer.step - k, trainer.step)
                return [tuple(t.to(device) for t in trainer.loader.batch(s)) for s in steps]

            log.info("overhead: warming up the Trainer%s", " (compiling)" if config.train.compile else "")
            warmup_s = timed(trainer_block, 1, device)[0] / 1000
            bare_block(replay())
            times = {"trainer": [], "bare": []}
            for r in range(rounds):
                batches = replay()
                blocks = [("trainer", trainer_block), ("bare", partial(bare_block, batches))]
                for name, block in blocks if r % 2 == 0 else blocks[::-1]:
                    ms, others = timed(block, 1, device)
                    times[name].append((ms / k, others))
                log.info("overhead round %d/%d: Trainer %.1f ms/step, bare %.1f ms/step", r + 1, rounds,
                         times["trainer"][-1][0], times["bare"][-1][0])
        finally:
            trainer.close()
    trainer_ms, bare_ms = spread(times["trainer"]), spread(times["bare"])
    pairs = list(zip(times["trainer"], times["bare"]))
    quiet_pairs = [(t, b) for t, b in pairs if is_quiet(t) and is_quiet(b)]
    per_round = [100 * (t[0] / b[0] - 1) for t, b in quiet_pairs or pairs]
    return {
        "config": {"preset": opts.preset, "batch_size": opts.batch_size, "seq_len": opts.seq_len,
                   "precision": "bf16 autocast" if trainer.autocast_dtype else "fp32",
                   "compile": config.train.compile, "grad_accum": trainer.grad_accum, "log_every": 1},
        "rounds": rounds, "steps_per_block": k, "warmup_s": round(warmup_s, 2),
        "trainer_ms": trainer_ms, "bare_ms": bare_ms,
        "overhead_pct": statistics.median(per_round),
        "overhead_pct_of_medians": 100 * (trainer_ms["median"] / bare_ms["median"] - 1),
        "overhead_pct_per_round": [round(x, 2) for x in per_round], "quiet_rounds": len(quiet_pairs),
        "goal_pct": TARGET_OVERHEAD_PCT,
        "what": "Trainer.run (loader over shards, LR schedule, clip_grad_norm_, loss/norm .item(), finite check, "
                "metrics.csv + train.log line every step) vs forward/backward/clip/AdamW on batches already on the "
                "device; same model, optimizer and tokens; blocks alternate trainer-bare, bare-trainer",
    }
