"""The optimizer step's costs and edges: one host sync, no logits kept alive, no norm without clipping, a GPU
out-of-memory as one line, an ETA that counts evaluations and checkpoints."""

import csv
import sys
import weakref
from pathlib import Path

import pytest
import torch
from test_faults import QUICK, run_main
from test_train import config, tiny_overrides

import gpt2forge
from gpt2forge.models.gpt2 import GPT
from gpt2forge.train.eta import Eta, events_left
from gpt2forge.train.memory_estimate import smaller_micro_batch
from gpt2forge.train.trainer import Trainer, train

PACKAGE = str(Path(gpt2forge.__file__).parent)
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def test_one_host_sync_per_optimizer_step(data_dir, tmp_path, monkeypatch):
    """Every way our code can read a tensor back to the host is counted when the package calls it: k steps of the
    reference recipe's loop (AdamW, clipping, the guard, the weights' check, the logs) make exactly k."""
    trainer = Trainer(config(data_dir, tmp_path, **{**QUICK, "train.max_steps": 8, "checkpoint.every": 4}))
    reads = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE):
                reads.append((_name, caller.rsplit("/", 1)[-1], sys._getframe(1).f_lineno))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        trainer.run(until=5)  # no evaluation (val_every 0), a checkpoint at step 4
    finally:
        monkeypatch.undo()
        trainer.close()
    # one per step, and the save's check of the weights it writes (finite, and their loss on the next batch)
    assert trainer.step == 5 and len(reads) == 5 + 1, reads


def test_the_logits_of_a_micro_step_are_gone_before_the_next_forward(data_dir, tmp_path, monkeypatch):
    alive_at_next_forward = []
    previous = {}
    real_forward = GPT.forward

    def forward(self, idx, targets=None, cache=None):
        if "logits" in previous:
            alive_at_next_forward.append(previous["logits"]() is not None)
        logits, loss = real_forward(self, idx, targets, cache)
        previous["logits"] = weakref.ref(logits)
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    trainer = Trainer(config(data_dir, tmp_path, **{**QUICK, "train.loss": "reference"}))  # it returns logits
    try:
        trainer.train_step()  # 2 micro-steps
        trainer.train_step()
    finally:
        trainer.close()
    assert alive_at_next_forward == [False, False, False]


def test_no_gradient_norm_without_clipping(data_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the gradient norm was computed with optim.grad_clip = 0")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", refuse)
    result = train(config(data_dir, tmp_path, **{**QUICK, "optim.grad_clip": 0}))
    with open(result.run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"]]
    assert len(rows) == 4 and all(r["grad_norm"] == "" for r in rows)  # logged empty


def test_smaller_micro_batch_keeps_the_batch_divisible():
    cfg = config("data", "out", **{"train.total_batch_tokens": 96 * 32, "train.micro_batch_size": 12})
    assert smaller_micro_batch(cfg.train, 1) == 6  # 96 sequences: 6 divides, ≤ half of 12
    assert smaller_micro_batch(cfg.train, 2) == 6  # 48 per rank
    assert smaller_micro_batch(cfg.train, 4) == 6  # 24 per rank: 6 still divides it
    one = config("data", "out", **{"train.micro_batch_size": 1, "train.total_batch_tokens": 32})
    assert smaller_micro_batch(one.train, 1) is None


def test_a_gpu_out_of_memory_is_one_line_naming_the_flag_and_a_value(data_dir, tmp_path, monkeypatch, capsys):
    def forward(self, idx, targets=None, cache=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.60 GiB")

    monkeypatch.setattr(GPT, "forward", forward)
    err = run_main(["train", *tiny_overrides(data_dir, tmp_path, **{**QUICK, "eval.val_every": 0})], monkeypatch,
                   capsys)
    assert "CUDA out of memory at micro-batch 4 (step 1): try --train.micro_batch_size=2" in err


def test_the_eta_counts_the_evaluations_and_checkpoints_still_due():
    assert events_left(250, 0, 1000, at_end=False) == 4 and events_left(300, 0, 1000, at_end=False) == 4
    assert events_left(0, 10, 1000, at_end=True) == 1 and events_left(0, 10, 1000, at_end=False) == 0
    assert events_left(100, 1000, 1000, at_end=True) == 0
    eta = Eta(100, {"val": (10, False), "checkpoint": (50, True)})
    eta.add("step", 1.0)
    assert eta.seconds_left(1) is None  # one step is no pace yet
    eta.add("step", 1.0)
    eta.add("val", 30.0)
    assert eta.seconds_left(2) == 98 * 1.0 + 10 * 30.0  # no checkpoint measured yet: counted once it is
    eta.add("checkpoint", 5.0)
    assert eta.seconds_left(2) == 98 + 300 + 2 * 5.0


def test_the_trainer_times_its_evaluations_and_checkpoints_for_the_eta(data_dir, tmp_path):
    trainer = Trainer(config(data_dir, tmp_path, **{**QUICK, "eval.val_every": 2}))
    try:
        trainer.run()
    finally:
        trainer.close()
    assert trainer.eta.count == {"step": 4, "val": 3, "checkpoint": 2}  # val at 0, 2, 4; checkpoints at 2, 4
    assert trainer.eta.mean("val") > 0 and trainer.eta.mean("checkpoint") > 0


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_a_skipped_step_is_logged_with_its_numbers(data_dir, tmp_path, monkeypatch, clip):
    from test_faults import scale_loss

    monkeypatch.setattr(GPT, "forward", scale_loss({2}, float("nan")))
    result = train(config(data_dir, tmp_path, **{**QUICK, "optim.grad_clip": clip}))
    assert result.step == 4 and result.losses[2] != result.losses[2]  # NaN: skipped, the run went on
