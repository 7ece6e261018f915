"""Shared fixtures: tiny random models (no downloads), so every test runs offline on a CPU in seconds."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2forge.data.shards import write_shard
from gpt2forge.models.gpt2 import GPT, GPTConfig

HELLASWAG_SAMPLE = Path(__file__).parent / "data" / "hellaswag_val_head64.jsonl"
VOCAB = 512  # the synthetic shards' vocabulary
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_multiple=1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where a GPU is (benchmarks/gpu_check.sh); elsewhere they are skipped, saying why."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run benchmarks/gpu_check.sh on one")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_train_logger():
    """Commands install a console handler on the training logger (and stop propagation); undo it per test so
    that ``caplog`` in later tests sees the records."""
    log = logging.getLogger("gpt2forge.train")
    saved = (log.handlers[:], log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig(**TINY)


@pytest.fixture
def tiny_model(tiny_config) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """A randomly initialised Hugging Face GPT2LMHeadModel saved to disk, with the real GPT-2 vocab size."""
    import transformers
    torch.manual_seed(1)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF zero-inits biases and LayerNorms; randomise them so the parity test covers them
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Training shards most tests share (tests that need others define their own ``data_dir``)."""
    return write_synthetic_shards(tmp_path_factory.mktemp("data"))


def write_synthetic_shards(directory):
    """Synthetic shards with learnable structure (a noisy repeating pattern) over a 512-token vocabulary."""
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, VOCAB, 97)
    for i, n in enumerate([4000, 20000, 20000]):
        tokens = np.resize(pattern, n)
        noise = rng.random(n) < 0.2
        tokens[noise] = rng.integers(0, VOCAB, noise.sum())
        split = "val" if i == 0 else "train"
        write_shard(directory / f"synthetic_{split}_{i:06d}.bin", tokens.astype(np.uint16))
    return directory


def after_adamw_update(update: int, damage):
    """A patched ``AdamW.step`` that calls ``damage(optimizer)`` (under no_grad) after its ``update``-th call: the
    weights a huge LR would leave, for the guard's tests."""
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == update:
            with torch.no_grad():
                damage(self)
        return out

    return step
