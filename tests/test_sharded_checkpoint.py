"""Sharded checkpoints (``checkpoint.format = "sharded"``, torch.distributed.checkpoint): every rank writes its own
shards in the background; a run resumes from them exactly, on another number of ranks, and refuses a damaged shard
by name; eval, sample and export read them as a full model."""

import json

import pytest
import torch
from test_train import config, metric_losses, tiny_overrides, torchrun

from gpt2forge import runs
from gpt2forge.errors import UserError
from gpt2forge.train import checkpoint as ckpt
from gpt2forge.train.trainer import train
from gpt2forge.weights import MODEL_CONFIG_FILE, SHARDED_DIR, load_model

SHARDED = {"checkpoint.format": "sharded", "eval.val_every": 0}
FSDP = {**SHARDED, "train.distributed": "fsdp", "checkpoint.format": "auto"}  # auto: sharded under FSDP


def test_one_process_sharded_checkpoint_resumes_bit_exactly_and_loads_as_a_model(data_dir, tmp_path):
    full = train(config(data_dir, tmp_path / "a", **SHARDED))
    train(config(data_dir, tmp_path / "b", **{**SHARDED, "train.max_steps": 4}))
    step4 = tmp_path / "b" / "run" / "step-000004"
    assert (step4 / SHARDED_DIR / ".metadata").is_file() and (step4 / MODEL_CONFIG_FILE).is_file()
    assert not (step4 / "model.safetensors").exists() and not (step4 / "optimizer.pt").exists()
    manifest = json.loads((step4 / runs.MANIFEST).read_text())["files"]
    assert f"{SHARDED_DIR}/__0_0.distcp" in manifest and f"{SHARDED_DIR}/.metadata" in manifest
    resumed = train(config(data_dir, tmp_path / "b", **SHARDED), resume="auto")
    assert resumed.losses == {s: full.losses[s] for s in range(5, 9)}  # exact float equality
    # the full model out of the shards: the same weights as a full checkpoint of the same run
    train(config(data_dir, tmp_path / "c", **{"eval.val_every": 0}))
    sharded, whole = load_model(tmp_path / "a" / "run"), load_model(tmp_path / "c" / "run")
    for (name, a), (_, b) in zip(sharded.state_dict().items(), whole.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_failed_background_write_stops_the_run_and_keeps_the_earlier_checkpoint(data_dir, tmp_path, monkeypatch):
    import errno
    from concurrent.futures import Future

    import torch.distributed.checkpoint as dcp

    from gpt2forge.train.trainer import TrainingStopped

    real, calls = dcp.async_save, []

    def failing_second(*args, **kwargs):
        calls.append(kwargs["checkpoint_id"])
        if len(calls) < 2:
            return real(*args, **kwargs)
        failed = Future()
        failed.set_exception(OSError(errno.ENOSPC, "No space left on device"))
        return failed

    monkeypatch.setattr(dcp, "async_save", failing_second)
    with pytest.raises(TrainingStopped) as stopped:
        train(config(data_dir, tmp_path, **{**SHARDED, "checkpoint.every": 2, "train.max_steps": 4}))
    run_dir = tmp_path / "run"
    assert "could not save checkpoint" in str(stopped.value) and "step-000004" in str(stopped.value)
    assert f"the newest checkpoint, {run_dir / 'step-000002'} (step 2), is intact" in str(stopped.value)
    assert [p.name for p in runs.step_dirs(run_dir)] == ["step-000002"] and not list(run_dir.glob("*.tmp"))
    assert runs.checkpoint_problems(run_dir / "step-000002") == []


@pytest.fixture(scope="module")
def fsdp_runs(data_dir, tmp_path_factory):
    """2-process FSDP runs: 8 steps uninterrupted (sharded checkpoints at 4 and 8), and 4 steps, sharded and full."""
    root = tmp_path_factory.mktemp("fsdp")
    torchrun(["train", *tiny_overrides(data_dir, root / "whole", **FSDP)])
    torchrun(["train", *tiny_overrides(data_dir, root / "half", **{**FSDP, "train.max_steps": 4})])
    torchrun(["train", *tiny_overrides(data_dir, root / "full", **{**FSDP, "train.max_steps": 4,
                                                                   "checkpoint.format": "full"})])
    assert (root / "half" / "run" / "step-000004" / SHARDED_DIR / "__1_0.distcp").is_file()  # rank 1 wrote its own
    assert (root / "full" / "run" / "step-000004" / "optimizer.pt").is_file()
    return root


def resumed(fsdp_runs, tmp_path, source: str, nproc: int, **extra) -> dict:
    """Resume a copy of one of ``fsdp_runs`` to step 8 on ``nproc`` processes; its losses by step."""
    import shutil

    shutil.copytree(fsdp_runs / source, tmp_path / source)
    torchrun(["train", "--resume", *tiny_overrides(data_dir_of(fsdp_runs, source), tmp_path / source,
                                                   **{**FSDP, **extra})], nproc=nproc)
    return metric_losses(tmp_path / source / "run")


def data_dir_of(fsdp_runs, source: str) -> str:
    from gpt2forge.config import load_config

    return load_config(str(fsdp_runs / source / "run" / runs.RUN_CONFIG)).data.dir


def test_two_process_fsdp_resumes_bit_exactly_from_its_sharded_checkpoint(fsdp_runs, tmp_path):
    assert resumed(fsdp_runs, tmp_path, "half", 2) == metric_losses(fsdp_runs / "whole" / "run")


@pytest.mark.parametrize("source", ["half", "full"])
def test_a_two_process_checkpoint_resumes_on_four_with_the_uninterrupted_losses(fsdp_runs, tmp_path, source):
    """Sharded: DCP reshards 2 ranks' shards into 4. Full: rank 0 reads it and broadcasts. The same global batch
    (4 × 2 micro-batches of 2 instead of 2 × 4); only the reduction order of a step's gradients differs."""
    losses = resumed(fsdp_runs, tmp_path, source, 4, **{"train.micro_batch_size": 2, "checkpoint.format":
                                                       "full" if source == "full" else "auto"})
    whole = metric_losses(fsdp_runs / "whole" / "run")
    assert losses.keys() == whole.keys()
    for step, loss in whole.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4)


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_a_damaged_shard_is_refused_by_name_and_the_newest_intact_checkpoint_named(fsdp_runs, tmp_path, damage):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_runs / "whole" / "run", run_dir)
    shard = run_dir / "step-000008" / SHARDED_DIR / "__1_0.distcp"
    if damage == "missing":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    with pytest.raises(UserError) as refused:
        ckpt.find_resume_checkpoint(run_dir, "auto")
    what = "is missing" if damage == "missing" else "does not match its sha256"
    assert f"step-000008, is damaged ({SHARDED_DIR}/__1_0.distcp {what}" in str(refused.value)
    assert f"The newest intact checkpoint is {run_dir / 'step-000004'} (step 4)" in str(refused.value)
    assert ckpt.find_resume_checkpoint(run_dir, str(run_dir / "step-000004")) == run_dir / "step-000004"


def test_eval_convert_and_export_read_a_sharded_checkpoint(fsdp_runs, tmp_path, data_dir):
    """The shards of 2 ranks read as one full model: the weights of the same run's full checkpoint, bit for bit;
    eval scores it alike, convert writes it as a weights file, export as a Hugging Face directory."""
    from gpt2forge.cli import main

    sharded, full = fsdp_runs / "half" / "run" / "step-000004", fsdp_runs / "full" / "run" / "step-000004"
    a, b = load_model(sharded).state_dict(), load_model(full).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    scores = []
    for source in (sharded, full):
        out = tmp_path / f"{source.parent.parent.name}.json"
        assert main(["eval", "--model", str(source), "--data", str(data_dir), "--val-tokens", "512",
                     "--out", str(out)]) == 0
        scores.append(json.loads(out.read_text())["val"]["loss"])
    assert scores[0] == scores[1]
    assert main(["convert", str(sharded), str(tmp_path / "converted"), "--to", "gpt2forge"]) == 0
    converted = load_model(tmp_path / "converted").state_dict()
    assert all(torch.equal(converted[k], a[k]) for k in a)
    assert main(["export", str(fsdp_runs / "half" / "run"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
