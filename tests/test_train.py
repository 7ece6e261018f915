"""The training loop: exact resume, fault handling, checkpoint retention, distributed equivalence, bad input."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB

from gpt2forge.config import load_config
from gpt2forge.errors import UserError
from gpt2forge.models import build_model
from gpt2forge.models.gpt2 import GPT
from gpt2forge.train import checkpoint as ckpt
from gpt2forge.train.trainer import TrainingStopped, train


def tiny_overrides(data_dir, out_dir, **extra):
    """A model and batch small enough for many steps a second on a CPU; 2 accumulation micro-steps."""
    settings = {
        "model.preset": "tiny", "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
        "model.vocab_size": VOCAB, "model.vocab_multiple": 64,
        "data.dir": data_dir, "log.out_dir": out_dir, "log.run_name": "run",
        "train.max_steps": 8, "train.micro_batch_size": 4, "train.seq_len": 32, "train.total_batch_tokens": 256,
        "train.device": "cpu", "train.precision": "fp32", "train.compile": False,
        "optim.lr": 1e-2, "optim.warmup_steps": 2, "optim.min_lr": 1e-3,
        "optim.decay_steps": 8,  # the schedule does not follow max_steps: runs of any length share their first steps
        "eval.val_every": 4, "eval.val_tokens": 512, "eval.hellaswag_every": 0, "eval.sample_every": 0,
        "checkpoint.every": 4, "checkpoint.keep_last": 2, "log.every": 1,
    }
    settings.update(extra)
    return [f"--{k}={v}" for k, v in settings.items()]


def config(data_dir, out_dir, **extra):
    return load_config(None, tiny_overrides(data_dir, out_dir, **extra))


def metric_losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}


def test_resumed_run_is_bit_identical(data_dir, tmp_path):
    full = train(config(data_dir, tmp_path / "a", **{"train.max_steps": 8}))
    assert len(full.losses) == 8 and full.losses[8] < full.losses[1]  # it learns
    first = train(config(data_dir, tmp_path / "b", **{"train.max_steps": 4}))
    assert first.step == 4
    resumed = train(config(data_dir, tmp_path / "b", **{"train.max_steps": 8}), resume="auto")
    assert resumed.losses == {s: full.losses[s] for s in range(5, 9)}  # exact float equality
    assert metric_losses(full.run_dir) == metric_losses(resumed.run_dir)  # one history, no duplicates


def test_checkpoints_are_complete_and_only_the_last_k_kept(data_dir, tmp_path):
    result = train(config(data_dir, tmp_path, **{"checkpoint.every": 1, "checkpoint.keep_last": 3}))
    kept = ckpt.complete_checkpoints(result.run_dir)
    assert [p.name for p in kept] == ["step-000006", "step-000007", "step-000008"]
    assert (result.run_dir / "latest").read_text().strip() == "step-000008"
    assert not list(result.run_dir.glob("*.tmp"))
    for piece in ("model.safetensors", "optimizer.pt", "loader.json", "train_state.json", "config.toml",
                  "manifest.json"):
        assert (kept[-1] / piece).is_file()
    evals = json.loads((kept[-1] / "training_eval.json").read_text())  # val_every=4 falls on step 8
    assert evals["step"] == 8 and evals["val_loss"] == result.val_loss
    assert not (kept[-2] / "training_eval.json").exists()
    for name in ("config.toml", "run.json", "metrics.csv", "train.log"):
        assert (result.run_dir / name).is_file()


def test_resuming_from_an_older_checkpoint_sets_the_later_ones_aside(data_dir, tmp_path):
    train(config(data_dir, tmp_path, **{"checkpoint.every": 2, "checkpoint.keep_last": 1}))
    run_dir = tmp_path / "run"
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == ["step-000008"]
    train(config(data_dir, tmp_path / "two", **{"checkpoint.every": 2, "checkpoint.keep_last": 10,
                                                "train.max_steps": 6}))
    two = tmp_path / "two" / "run"
    result = train(config(data_dir, tmp_path / "two", **{"checkpoint.every": 2, "checkpoint.keep_last": 1}),
                   resume=str(two / "step-000002"))
    assert min(result.losses) == 3  # continued after step 2
    assert (two / "step-000004.superseded").is_dir() and (two / "step-000006.superseded").is_dir()
    # keep_last=1 kept the newest (never the one just written away), and latest names it
    assert [p.name for p in ckpt.complete_checkpoints(two)] == ["step-000008"]
    assert ckpt.find_resume_checkpoint(two, "auto").name == "step-000008"


def test_a_crash_while_replacing_a_checkpoint_is_repaired(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "step-000004.old").mkdir(parents=True)  # renamed away, but its replacement never landed
    (run_dir / "step-000004.old" / "model.safetensors").write_text("x")
    (run_dir / "step-000006.tmp").mkdir()
    ckpt.remove_stale_temporaries(run_dir)
    assert (run_dir / "step-000004" / "model.safetensors").is_file()
    assert not (run_dir / "step-000004.old").exists() and not (run_dir / "step-000006.tmp").exists()


def test_existing_run_needs_resume_and_resume_needs_same_architecture(data_dir, tmp_path):
    train(config(data_dir, tmp_path, **{"train.max_steps": 4}))
    with pytest.raises(UserError, match="already has checkpoints .*pass --resume"):
        train(config(data_dir, tmp_path, **{"train.max_steps": 4}))
    with pytest.raises(UserError, match="different architecture"):
        train(config(data_dir, tmp_path, **{"train.max_steps": 8, "model.n_layer": 3}), resume="auto")
    with pytest.raises(UserError, match="sequences_per_step: checkpoint 8, now 16"):
        train(config(data_dir, tmp_path, **{"train.max_steps": 8, "train.total_batch_tokens": 512}), resume="auto")


def test_non_finite_steps_are_skipped_then_stop_the_run(data_dir, tmp_path, monkeypatch):
    real_forward = GPT.forward
    calls = {"n": 0}
    poisoned_steps = set(range(3, 20))  # optimizer steps (1-based) whose loss is NaN: 3 onwards

    def forward(self, idx, targets=None, cache=None):
        logits, loss = real_forward(self, idx, targets, cache)
        if targets is not None and torch.is_grad_enabled():
            calls["n"] += 1
            if (calls["n"] - 1) // 2 + 1 in poisoned_steps:  # 2 micro-steps per step
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    snapshots = {}
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        snapshots["last_update"] = calls["n"]
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = config(data_dir, tmp_path, **{"train.max_bad_steps": 3, "eval.val_every": 0})
    with pytest.raises(TrainingStopped, match="3 consecutive steps were skipped, with a non-finite .* last: step 5"):
        train(cfg)
    assert snapshots["last_update"] == 4  # the optimizer ran for steps 1-2 only (micro-calls 1-4)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [r["loss"] for r in rows if r["step"] in ("3", "4", "5")] == ["nan"] * 3


def test_a_skipped_step_leaves_the_weights_unchanged(data_dir, tmp_path, monkeypatch):
    from gpt2forge.train.trainer import Trainer

    trainer = Trainer(config(data_dir, tmp_path, **{"eval.val_every": 0}))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real_forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, idx, targets=None, cache=None: (
        real_forward(self, idx, targets, cache)[0], real_forward(self, idx, targets, cache)[1] * float("inf")))
    out = trainer.train_step()
    trainer.close()
    assert out["skipped"].startswith("non-finite loss inf") and trainer.guard.bad_steps == 1
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    adamw = trainer.optimizers.optimizers["adamw"]
    assert adamw.state == {} or all(len(s) == 0 for s in adamw.state.values())


def run_cli(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "gpt2forge.cli", *args], capture_output=True, text=True, **kwargs)


# SIGTERM, SIGKILL mid-step and mid-save, and the other faults: tests/test_faults.py


def torchrun(args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "gpt2forge.cli", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_process_ddp_matches_one_process_with_accumulation_and_resumes_exactly(data_dir, tmp_path):
    common = {"eval.val_every": 4, "checkpoint.every": 4}
    # 1 process: micro-batch 4, 2 accumulation steps. 2 processes: micro-batch 4 each, no accumulation.
    single = train(config(data_dir, tmp_path / "single", **common))
    torchrun(["train", *tiny_overrides(data_dir, tmp_path / "ddp", **common)])
    ddp = metric_losses(tmp_path / "ddp" / "run")
    assert ddp.keys() == single.losses.keys()
    for step, loss in single.losses.items():
        assert ddp[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    # 2-process resume: 4 steps, then resume to 8: bit-identical to the uninterrupted 2-process run
    torchrun(["train", *tiny_overrides(data_dir, tmp_path / "ddp2", **{**common, "train.max_steps": 4})])
    torchrun(["train", "--resume", *tiny_overrides(data_dir, tmp_path / "ddp2", **common)])
    assert metric_losses(tmp_path / "ddp2" / "run") == ddp


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_two_process_fsdp_matches_one_process_and_resumes_exactly(data_dir, tmp_path, arch):
    # 384 val tokens = 3 batches of 4×32: an odd count that must not leave one rank in an extra collective
    fsdp = {"model.arch": arch, "train.distributed": "fsdp", "eval.val_every": 4, "eval.val_tokens": 384,
            "checkpoint.every": 4}
    single = train(config(data_dir, tmp_path / "single", **{"model.arch": arch, "eval.val_every": 0}))
    torchrun(["train", *tiny_overrides(data_dir, tmp_path / "fsdp", **fsdp)])
    sharded = metric_losses(tmp_path / "fsdp" / "run")
    for step, loss in single.losses.items():
        assert sharded[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    torchrun(["train", *tiny_overrides(data_dir, tmp_path / "fsdp2", **{**fsdp, "train.max_steps": 4})])
    torchrun(["train", "--resume", *tiny_overrides(data_dir, tmp_path / "fsdp2", **fsdp)])
    assert metric_losses(tmp_path / "fsdp2" / "run") == sharded
    # the checkpoint holds the full, unsharded model: it loads on its own
    from gpt2forge.weights import load_model

    expected = build_model(config(data_dir, tmp_path, **{"model.arch": arch}).model).num_params()
    assert load_model(tmp_path / "fsdp2" / "run").num_params() == expected


def test_data_dir_without_shards_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli(["train", *tiny_overrides(tmp_path / "empty", tmp_path)])
    assert result.returncode == 2 and "no train shards" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # the failed launch left no empty run directory with a .lock behind
    result = run_cli(["train", "--config", "quickstart", "--optim.lr=fast"])
    assert result.returncode == 2 and "optim.lr: cannot read 'fast' as float" in result.stderr


def test_validation_hellaswag_and_sampling_work_with_compile_on(data_dir, tmp_path, caplog):
    """build-nanogpt had to switch compile off for its evals; here they run on the compiled model."""
    import logging

    from conftest import HELLASWAG_SAMPLE

    cfg = config(data_dir, tmp_path, **{
        "model.vocab_size": 50257, "model.vocab_multiple": 128, "train.compile": True, "train.max_steps": 2,
        "eval.val_every": 2, "eval.hellaswag_every": 2, "eval.hellaswag_file": str(HELLASWAG_SAMPLE),
        "eval.hellaswag_limit": 8,
        "eval.sample_every": 2, "eval.sample_tokens": 5, "eval.num_samples": 1, "checkpoint.every": 0,
    })
    with caplog.at_level(logging.INFO, logger="gpt2forge.train"):
        result = train(cfg)
    rows = list(csv.DictReader(open(result.run_dir / "metrics.csv")))
    evals = [r for r in rows if r["val_loss"]]
    assert [r["step"] for r in evals] == ["0", "2"]
    assert all(0.0 <= float(r["hellaswag_acc_norm"]) <= 1.0 for r in evals)
    assert "sample 0: Hello, I'm a language model," in caplog.text


def test_tensorboard_receives_the_metrics(data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(config(data_dir, tmp_path, **{"log.tensorboard": True, "train.max_steps": 4}))
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val_loss")] == [0, 4]
    assert events.Scalars("loss")[-1].value == pytest.approx(result.losses[4])


MUON = {"optim.optimizer": "muon", "optim.matrix_lr": 0.02, "optim.muon_momentum_warmup_steps": 4}


def test_two_optimizers_muon_and_adamw_resume_bit_exactly(data_dir, tmp_path):
    """Muon for the hidden matrices, AdamW for the rest: both states go into the checkpoint and come back."""
    full = train(config(data_dir, tmp_path / "a", **MUON))
    assert full.losses[8] < full.losses[1]
    train(config(data_dir, tmp_path / "b", **{**MUON, "train.max_steps": 4}))
    saved = torch.load(tmp_path / "b" / "run" / "step-000004" / "optimizer.pt", weights_only=True)
    assert set(saved) == {"adamw", "muon"}
    assert all("momentum_buffer" in s for s in saved["muon"]["state"].values())
    resumed = train(config(data_dir, tmp_path / "b", **MUON), resume="auto")
    assert resumed.losses == {s: full.losses[s] for s in range(5, 9)}
    with pytest.raises(UserError, match="holds the state of optimizer\\(s\\) adamw, muon, this run has adamw"):
        train(config(data_dir, tmp_path / "b", **{"train.max_steps": 12}), resume="auto")


def test_muon_two_process_ddp_matches_one_process_with_accumulation(data_dir, tmp_path):
    """Under DDP each rank orthogonalises a share of the matrices; the result is that of one process."""
    single = train(config(data_dir, tmp_path / "single", **{**MUON, "eval.val_every": 0}))
    torchrun(["train", *tiny_overrides(data_dir, tmp_path / "ddp", **{**MUON, "eval.val_every": 0})])
    ddp = metric_losses(tmp_path / "ddp" / "run")
    for step, loss in single.losses.items():
        assert ddp[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)
