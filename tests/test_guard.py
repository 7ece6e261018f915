"""The step guard (train/guard.py) and what it protects: a divergence never replaces the last healthy checkpoint."""

import math
import sys

import pytest
import torch
from conftest import after_adamw_update
from test_faults import QUICK, run_main
from test_train import config, tiny_overrides

from gpt2forge.config import load_config
from gpt2forge.train import checkpoint as ckpt
from gpt2forge.train.guard import StepGuard
from gpt2forge.train.trainer import TrainingStopped, train


def guard(**train):
    return StepGuard(load_config(None, [f"--train.{k}={v}" for k, v in train.items()]).train, vocab_size=50257)


def test_the_absolute_rules_need_no_history_and_the_zscore_waits_for_it():
    g = guard()
    bound = math.log(50257) + 5
    assert g.judge(10.95, 3.0) is None  # an untrained GPT-2's first step: about ln(vocab)
    assert "above ln(vocab) + train.spike_loss_margin" in g.judge(bound + 0.1, 3.0)  # step 1, no history
    assert "non-finite" in g.judge(float("nan"), 1.0) and "non-finite" in g.judge(3.0, float("inf"))
    g.record(1, 3.0, 1.0, None)
    assert g.judge(13.0, 1.0).startswith("loss 13 is a spike, more than train.spike_jump=4 times")  # 4.1e12 alike
    assert g.judge(0.5, 1.0) is None and g.judge(11.9, 1.0) is None
    assert "train.spike_grad_ratio=100" in g.judge(3.0, 150.0)  # gradient norm 150× the median of the window
    for step in range(2, 10):  # the z-score needs spike_min_history losses
        g.record(step, 3.0 + 0.01 * (step % 2), 1.0, None)
    assert g.judge(3.5, 1.0) is None
    g = guard(spike_min_history=4, spike_window=8)
    for step in range(1, 5):
        g.record(step, 3.0 + 0.01 * (step % 2), 1.0, None)
    assert "standard deviations above the mean of the last 4" in g.judge(3.5, 1.0)
    off = guard(spike_loss_margin=0, spike_jump=0, spike_grad_ratio=0, spike_zscore=0)
    off.record(1, 3.0, 1.0, None)
    assert off.judge(1e6, 1e6) is None  # every rule can be switched off; non-finite values never pass
    assert off.judge(float("nan"), 1.0) is not None


def test_the_guard_state_round_trips_and_reads_an_older_train_state():
    g = guard()
    g.record(1, 3.0, 1.0, None)
    g.record(2, 99.0, 1.0, "a spike")
    again = guard()
    again.load_state_dict(g.state_dict())
    assert again.state_dict() == g.state_dict() and again.in_trouble(2) and again.bad_steps == 1
    older = guard()  # a train_state.json of before the guard had its own file
    older.load_state_dict({"step": 8, "bad_steps": 0, "first_bad_step": None, "loss_window": [3.0, 2.9]})
    assert list(older.losses) == [3.0, 2.9] and not older.in_trouble(8)


def test_a_huge_lr_on_resume_stops_nonzero_keeps_the_healthy_checkpoint_and_it_trains_on(data_dir, tmp_path,
                                                                                          monkeypatch, capsys):
    """Issue 22's scenario: a healthy run with keep_last=1, resumed with --optim.lr=1e6 --train.reschedule=true."""
    settings = {**QUICK, "checkpoint.keep_last": 1, "optim.decay_steps": 8}
    train(config(data_dir, tmp_path, **settings))
    run_dir = tmp_path / "run"
    args = ["train", *tiny_overrides(data_dir, tmp_path, **{**settings, "train.max_steps": 8, "optim.lr": 1e6,
                                                            "train.reschedule": True}), "--resume"]
    err = run_main(args, monkeypatch, capsys)  # exit status 2, one line
    assert f"The last healthy checkpoint is {run_dir / 'step-000004'} (step 4)" in err
    assert "optim.lr=1e+06" in err and "--optim.lr=500000 --train.reschedule=true" in err
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == ["step-000004"]  # it survived keep_last=1
    sane = config(data_dir, tmp_path, **{**settings, "train.max_steps": 8})
    resumed = train(sane, resume=str(run_dir / "step-000004"))
    assert min(resumed.losses) == 5 and resumed.step == 8 and all(map(math.isfinite, resumed.losses.values()))


def explode_update(update: int, factor: float = 1e3):
    """A patched AdamW step whose ``update``-th call scales the weights: finite, absurd (as a huge LR leaves them)."""
    return after_adamw_update(update, lambda opt: torch._foreach_mul_(
        [p for group in opt.param_groups for p in group["params"]], factor))


def test_an_update_that_breaks_the_weights_right_before_a_save_is_never_saved(data_dir, tmp_path, monkeypatch):
    """The weights after step 5 are finite but absurd and step 5's loss looked fine: the probe before the save
    catches them, nothing is saved or pruned after step 4, and the run ends with an error naming step 4."""
    monkeypatch.setattr(torch.optim.AdamW, "step", explode_update(5))
    settings = {**QUICK, "checkpoint.every": 1, "checkpoint.keep_last": 1, "train.max_steps": 8,
                "optim.decay_steps": 8}
    with pytest.raises(TrainingStopped) as stopped:
        train(config(data_dir, tmp_path, **settings))
    run_dir = tmp_path / "run"
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == ["step-000004"]
    assert f"The last healthy checkpoint is {run_dir / 'step-000004'} (step 4)" in str(stopped.value)


def test_a_save_due_right_after_a_skipped_step_waits_for_a_healthy_one(data_dir, tmp_path, monkeypatch, caplog):
    from test_faults import scale_loss

    from gpt2forge.models.gpt2 import GPT

    monkeypatch.setattr(GPT, "forward", scale_loss({4}, 50.0))
    with caplog.at_level("WARNING", logger="gpt2forge.train"):
        result = train(config(data_dir, tmp_path, **{**QUICK, "checkpoint.every": 4, "checkpoint.keep_last": 5,
                                                     "train.max_steps": 8}))
    assert "step 4: checkpoint postponed while the run is in trouble" in caplog.text
    assert [p.name for p in ckpt.complete_checkpoints(result.run_dir)] == ["step-000005", "step-000008"]


def test_the_guard_history_survives_resume_and_applies_from_the_first_resumed_step(data_dir, tmp_path, monkeypatch):
    from test_faults import scale_loss

    from gpt2forge.models.gpt2 import GPT

    train(config(data_dir, tmp_path, **QUICK))
    monkeypatch.setattr(GPT, "forward", scale_loss({1}, 2.5))  # the resumed launch's first step: ×2.5, a jump
    monkeypatch.setattr(sys.modules["gpt2forge.train.guard"], "JUMP_MIN_NATS", 0.0)
    resumed = train(config(data_dir, tmp_path, **{**QUICK, "train.max_steps": 8, "optim.decay_steps": 8,
                                                  "train.spike_jump": 2.0}), resume="auto")
    state = ckpt.read_piece(None, resumed.run_dir / "step-000008" / "guard.json")
    assert state["last_bad_step"] == 5  # judged against the loss of step 4, which came from the checkpoint
