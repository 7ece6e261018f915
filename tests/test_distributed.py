"""Distributed correctness: launches form one process group on any device, validation scores the same tokens on
any number of ranks, and a run resumes on another number of processes with the losses of an uninterrupted run."""

import os
import subprocess

import numpy as np
import pytest
import torch
from test_train import config, metric_losses, tiny_overrides, torchrun

from gpt2forge.data.loader import val_batches
from gpt2forge.device import autocast_dtype, gpu_model
from gpt2forge.eval.baseline import val_targets
from gpt2forge.models import IGNORE_INDEX
from gpt2forge.train.trainer import train


def scored(batches) -> list[int]:
    return [t for _, y in batches for t in y[y != IGNORE_INDEX].tolist()]


@pytest.mark.parametrize("max_tokens", [None, 1000])
def test_val_set_depends_on_the_token_budget_only(data_dir, max_tokens):
    """Same targets, in the same order, for any batch size and world size; the same number of fixed-shape batches
    on every rank; and exactly the tokens the unigram baseline scores."""
    reference = scored(val_batches(data_dir, 4, 32, max_tokens=max_tokens))
    expected = np.concatenate(val_targets(data_dir, 32, max_tokens or 0)).tolist()
    assert reference == expected and len(reference) == (max_tokens or 4000 - 1) // 32 * 32
    for batch_size in (3, 5):
        for world in (1, 2, 3):
            per_rank = [list(val_batches(data_dir, batch_size, 32, rank=r, world_size=world, max_tokens=max_tokens))
                        for r in range(world)]
            assert len({len(b) for b in per_rank}) == 1  # FSDP: the same number of forward passes everywhere
            assert all(x.shape == (batch_size, 32) for b in per_rank for x, _ in b)
            interleaved = [batch for i in range(len(per_rank[0])) for b in per_rank for batch in [b[i]]]
            assert scored(interleaved) == reference


def test_same_weights_same_val_loss_on_1_2_and_3_ranks(data_dir, tmp_path):
    train(config(data_dir, tmp_path, **{"train.max_steps": 2, "eval.val_every": 0}))
    losses = []
    for n in (1, 2, 3):
        out = tmp_path / f"eval{n}.json"
        torchrun(["eval", "--model", str(tmp_path / "run"), "--data", str(data_dir), "--batch-size", "5",
                  "--val-tokens", "2000", "--out", str(out)], nproc=n)
        import json

        result = json.loads(out.read_text())["val"]
        assert result["tokens"] == 2000 // 32 * 32
        losses.append(result["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-12) and losses[2] == pytest.approx(losses[0], rel=1e-12)


def test_two_processes_with_the_default_device_form_one_group(data_dir, tmp_path):
    """train.device=auto on a host without CUDA: one 2-rank run, not two runs that each think they are rank 0."""
    args = [a for a in tiny_overrides(data_dir, tmp_path, **{"train.max_steps": 2, "eval.val_every": 0})
            if not a.startswith("--train.device")]
    result = torchrun(["train", *args])
    assert "2 rank(s)" in result.stdout and result.stdout.count("fresh start") == 1


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_elastic_resume_on_another_world_size(data_dir, tmp_path, first, second):
    """4 steps on ``first`` processes, then resumed to 8 on ``second``: the losses of an uninterrupted run (the same
    global batches and optimizer state; only the reduction order of a step's gradients differs)."""
    common = {"eval.val_every": 0, "checkpoint.every": 4}
    full = train(config(data_dir, tmp_path / "full", **common)).losses

    def launch(n: int, resume: bool, **extra) -> None:
        overrides = {**common, **extra}
        if n == 1:
            train(config(data_dir, tmp_path / "elastic", **overrides), resume="auto" if resume else None)
        else:
            torchrun(["train", *(["--resume"] if resume else []),
                      *tiny_overrides(data_dir, tmp_path / "elastic", **overrides)], nproc=n)

    launch(first, False, **{"train.max_steps": 4})
    launch(second, True)
    losses = metric_losses(tmp_path / "elastic" / "run")
    assert sorted(losses) == list(range(1, 9))
    for step, loss in full.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6)


def test_accelerate_launch_cpu_single_process_is_refused(data_dir, tmp_path):
    cmd = ["accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "gpt2forge.cli", "train",
           *tiny_overrides(data_dir, tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300, check=False)
    assert result.returncode != 0
    assert "asked for 2 processes but started one" in result.stderr + result.stdout
    assert not (tmp_path / "run" / "metrics.csv").exists()  # nothing trained alone


def test_gpu_names_match_whole_words_and_auto_precision_needs_native_bf16(monkeypatch):
    assert gpu_model("NVIDIA L40") == "L40" and gpu_model("NVIDIA L4") == "L4"
    assert gpu_model("NVIDIA GH200 480GB") == "GH200" and gpu_model("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu_model("NVIDIA A10") is None
    assert autocast_dtype("auto", "cpu") is None and autocast_dtype("bf16", "cpu") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: emulated bf16
    assert autocast_dtype("auto", "cuda") is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert autocast_dtype("auto", "cuda") is torch.bfloat16


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_compiled_two_process_training_matches_eager(data_dir, tmp_path, distributed):
    """torch.compile under DDP (the whole wrapped model) and under FSDP2 (each block, compiled before sharding), on 2
    gloo processes: the losses of an eager 1-process run with 2 accumulation steps, to compile's rounding."""
    common = {"train.max_steps": 4, "eval.val_every": 0, "checkpoint.every": 0}
    eager = train(config(data_dir, tmp_path / "eager", **common)).losses
    torchrun(["train", *tiny_overrides(data_dir, tmp_path / "compiled",
                                       **{**common, "train.compile": True, "train.distributed": distributed})])
    compiled = metric_losses(tmp_path / "compiled" / "run")
    assert compiled.keys() == eager.keys()
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-4)


def test_ddp_options_and_fsdp_mixed_precision_policy():
    """DDP broadcasts no buffers and keeps gradients in its buckets; FSDP2 gathers bf16 and reduces fp32 in a bf16
    run, and keeps parameters as stored otherwise. One gloo process is a process group, so DDP wraps."""
    import torch.distributed as torch_dist

    from gpt2forge.train.parallelize import Parallel, fsdp_policy

    policy = fsdp_policy(torch.bfloat16)
    assert policy.param_dtype is torch.bfloat16 and policy.reduce_dtype is torch.float32
    assert fsdp_policy(None).param_dtype is None and fsdp_policy(None).reduce_dtype is None
    parallel = Parallel(None, torch.device("cpu"), 0, 1, fsdp=False)
    model = torch.nn.Linear(4, 4)
    assert parallel.wrap(model) is model  # no process group: nothing to wrap
    torch_dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        ddp = parallel.wrap(model)
        assert type(ddp).__name__ == "DistributedDataParallel"
        assert ddp.broadcast_buffers is False and ddp.gradient_as_bucket_view is True
    finally:
        torch_dist.destroy_process_group()
