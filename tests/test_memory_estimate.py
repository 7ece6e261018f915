"""The memory estimate: its activation formula counts what autograd keeps, its total is near a measured peak, and
what it advises (the micro-batch that fits, the out-of-memory message, ``--print-config``'s comments) follows."""

import ctypes
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2forge.commands import main
from gpt2forge.config import grad_accum_steps, load_config
from gpt2forge.errors import UserError
from gpt2forge.models import Runtime, build_model
from gpt2forge.train import memory_estimate as me

SMALL = {"model.preset": "tiny", "model.n_layer": 6, "model.n_embd": 256, "model.block_size": 256,
         "model.vocab_size": 4096, "train.seq_len": 256, "train.micro_batch_size": 16,
         "train.total_batch_tokens": 8192, "train.device": "cpu", "train.compile": False}


def small(**extra) -> list[str]:
    return [f"--{k}={v}" for k, v in {**SMALL, **extra}.items()]


def saved_by_autograd(config, bf16: bool) -> int:
    """Bytes of the distinct tensors autograd saves in one forward, parameters and the logits left out."""
    m, t = config.model, config.train
    torch.manual_seed(0)
    model = build_model(m, Runtime(attention=t.attention, loss="chunked"))
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    rows, seen = t.micro_batch_size * t.seq_len, {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        logits = tensor.numel() in (rows * m.vocab_size, rows * m.padded_vocab_size)
        if not logits and storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randint(0, m.vocab_size, (t.micro_batch_size, t.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=bf16):
        model(x, x)
    return sum(seen.values())


@pytest.mark.parametrize("arch, extra, bf16", [
    ("gpt2", {}, False), ("gpt2", {}, True), ("gpt2", {"train.attention": "manual"}, False),
    ("modern", {}, False), ("modern", {}, True),
    ("modern", {"model.qk_norm": False, "model.embed_norm": False}, True),
    ("modern", {"model.qk_norm": False, "model.rope_fraction": 0.0, "model.mlp": "gelu"}, False),
])
def test_activation_formula_counts_what_autograd_saves(arch, extra, bf16):
    """Exact up to the per-row statistics (norm means and scales, attention log-sum-exps): within 3%. (Not bf16
    with manual attention: the formula counts CUDA autocast's fp32 softmax, a CPU keeps it in bf16.)"""
    config = load_config(None, [f"--{k}={v}" for k, v in {
        "model.arch": arch, "model.preset": "tiny", "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 128,
        "model.block_size": 64, "model.vocab_size": 1000, "model.vocab_multiple": 8, "train.seq_len": 64,
        "train.micro_batch_size": 3, "train.total_batch_tokens": 192, **extra}.items()])
    measured = saved_by_autograd(config, bf16)
    assert me.saved_activation_bytes(config, 3, bf16) == pytest.approx(measured, rel=0.03)


def peak_rss_of_training(overrides: list[str]) -> dict:
    """In this (fresh) process: the peak RSS over the baseline of building the model and optimizers and running
    two optimizer steps of two micro-steps each, as the trainer's step does them; and the estimate."""
    from gpt2forge.device import autocast
    from gpt2forge.optim import build_optimizers

    def rss_kib(field: str) -> int:
        return int(re.search(rf"^{field}:\s+(\d+)", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))

    torch.set_num_threads(1)
    config = load_config(None, overrides)
    t, bf16 = config.train, config.train.precision == "bf16"
    x = torch.randint(0, config.model.vocab_size, (t.micro_batch_size, t.seq_len))
    accumulation = grad_accum_steps(config, 1)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark
    base = rss_kib("VmRSS")
    torch.manual_seed(0)
    model = build_model(config.model, Runtime(attention=t.attention, loss=t.loss))
    optimizers = build_optimizers(model, config.optim, "cpu", t.max_steps)
    for step in range(2):
        optimizers.set_step(step)
        for _ in range(accumulation):
            with autocast("cpu", torch.bfloat16 if bf16 else None):
                _, loss = model(x, x)
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizers.step()
        optimizers.zero_grad(set_to_none=True)
    return {"measured": (rss_kib("VmHWM") - base) * 1024,
            "estimated": me.estimate_memory(config, 1, bf16=bf16, device_type="cpu").total}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc to measure peak RSS")
@pytest.mark.parametrize("extra", [
    {"train.loss": "chunked", "train.precision": "fp32"},  # GPT-2, AdamW: activations are most of it
    {"model.arch": "modern", "optim.optimizer": "muon", "train.loss": "reference", "train.precision": "bf16"},
])
def test_estimate_is_near_the_measured_peak(extra):
    """Within ±25% of the peak RSS of training (measured 0.93–1.02 × when written). glibc's mmap threshold is
    fixed so that a freed tensor leaves the RSS, as it leaves CUDA's allocated memory; with its default the heap
    keeps freed mid-size blocks and the RSS reads up to 1.6× the live tensors."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_memory_estimate import peak_rss_of_training; "
            f"print(json.dumps(peak_rss_of_training({small(**extra)!r})))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.splitlines()[-1])
    assert numbers["estimated"] == pytest.approx(numbers["measured"], rel=0.25), numbers


def test_components_follow_the_optimizer_and_the_sharding():
    adamw = me.estimate_memory(load_config(None, small()))
    n = me.counts(load_config(None, small())).total
    assert (adamw.weights, adamw.gradients, adamw.optimizer, adamw.buffers) == (4 * n, 4 * n, 8 * n, 0)
    muon_config = load_config(None, small(**{"model.arch": "modern", "optim.optimizer": "muon"}))
    counts, muon = me.counts(muon_config), me.estimate_memory(muon_config)
    assert muon.optimizer == 8 * (counts.total - counts.muon) + 4 * counts.muon and counts.muon > counts.total / 2
    fsdp = load_config(None, small(**{"train.distributed": "fsdp"}))
    one, eight = me.estimate_memory(fsdp, 1), me.estimate_memory(fsdp, 8)
    assert eight.weights == -(-4 * n // 8) and eight.optimizer == -(-8 * n // 8)
    assert eight.activations == one.activations and eight.buffers > 0
    assert me.estimate_memory(load_config(None, small()), 8).buffers == 4 * n  # DDP's gradient buckets
    b32 = me.estimate_memory(load_config(None, small()), micro_batch_size=32)
    assert b32.activations == 2 * adamw.activations  # linear in the micro-batch


def test_fitting_micro_batch_is_the_largest_divisor_that_fits():
    config = load_config("gpt2-124m-fineweb-edu-10b", ["--train.micro_batch_size=64"])
    fits = me.fitting_micro_batch(config, 40 * 2**30)
    budget = 40 * 2**30 * (1 - me.HEADROOM)
    assert me.estimate_memory(config, 1, fits, True).total <= budget < me.estimate_memory(config, 1, 2 * fits,
                                                                                          True).total
    assert grad_accum_steps(load_config("gpt2-124m-fineweb-edu-10b", [f"--train.micro_batch_size={fits}"]), 1)
    assert me.fitting_micro_batch(config, 40 * 2**30, at_most=fits // 2) == fits // 2
    odd = load_config("gpt2-124m-fineweb-edu-10b", ["--train.total_batch_tokens=3072", "--train.micro_batch_size=3"])
    assert me.fitting_micro_batch(odd, 80 * 2**30) == 3 and me.fitting_micro_batch(odd, 80 * 2**30, at_most=2) == 1
    assert me.fitting_micro_batch(load_config("gpt2-1558m-fineweb-edu-100b"), 8 * 2**30) is None


def test_out_of_memory_becomes_one_line_with_the_micro_batch_that_fits(monkeypatch):
    monkeypatch.setattr(me, "device_memory", lambda device: 40 * 2**30)
    config = load_config("gpt2-124m-fineweb-edu-10b")
    expected = me.fitting_micro_batch(config, 40 * 2**30, at_most=63)
    with pytest.raises(UserError, match=rf"CUDA out of memory at micro-batch 64 on a 40.0 GiB GPU: "
                                        rf"--train.micro_batch_size={expected} fits by the estimate") as error:
        with me.explain_out_of_memory(config, 1, True, "cuda"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.3 GiB")
    assert "\n" not in str(error.value) and isinstance(error.value.__cause__, torch.OutOfMemoryError)
    assert "fits by the estimate" in me.memory_summary(config, 1, True, "cuda")  # 60+ GiB > 40: said up front
    xl = load_config("gpt2-1558m-fineweb-edu-100b")
    monkeypatch.setattr(me, "device_memory", lambda device: 8 * 2**30)
    assert "no micro-batch fits; shard the model" in me.out_of_memory_message(xl, 1, True, "cuda")


def test_print_config_shows_the_estimate_as_comments(capsys, tmp_path):
    assert main(["train", "--config", "gpt2-1558m-fineweb-edu-100b", "--print-config"]) == 0
    printed = capsys.readouterr().out
    header = [line for line in printed.splitlines() if line.startswith("#")]
    assert header[0].startswith("# memory per rank by the estimate") and "bf16 autocast" in header[0]
    assert "(micro-batch 8, 1 rank(s)" in header[1] and "(micro-batch 8, 8 rank(s)" in header[2]
    assert "80 GiB → 8" in header[3]
    (tmp_path / "printed.toml").write_text(printed)
    assert load_config(str(tmp_path / "printed.toml")) == load_config("gpt2-1558m-fineweb-edu-100b")


def test_chunked_loss_peak_counts_the_chunks_of_the_device_it_runs_on():
    """Eager on a CPU the chunked loss works in 2 MB chunks (``models/loss.py``), compiled or on a GPU in up to
    256 MB ones: the estimate counts the ones the run will have."""
    from gpt2forge.models import loss as lm

    rows, vocab = 16 * 256, 4096  # SMALL's micro-batch: 4,096 rows of 4,096 columns
    for compiled in (False, True):
        config = load_config(None, small(**{"train.loss": "chunked", "train.compile": compiled}))
        extra = {device: me.loss_peak_bytes(config, 16, False, device) - 2 * 4 * rows * vocab
                 for device in ("cpu", "cuda")}
        big = min(rows, lm.CHUNK_BYTES // (4 * vocab)) * 4 * vocab
        assert extra["cuda"] == me.CHUNKS_ALIVE * big
        assert extra["cpu"] == me.CHUNKS_ALIVE * (big if compiled else lm.CPU_EAGER_CHUNK_BYTES)
    eager = load_config(None, small(**{"train.loss": "chunked"}))
    assert me.estimate_memory(eager, device_type="cpu").total < me.estimate_memory(eager).total
