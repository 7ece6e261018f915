"""The reference recipe's per-step losses, pinned: a golden record the current code must reproduce bit for bit.

The reference recipe (``gpt2-124m-fineweb-edu-10b``: GPT-2 architecture, the reference loss, AdamW with GPT-2's
decay groups, warmup + cosine, grad clip 1.0, 2 accumulation micro-steps) scaled down as
``benchmarks/loss_compare.py`` scales it (2 layers, 64-wide, 64-token sequences, synthetic shards over GPT-2's
vocabulary), fp32 on the CPU, one thread. The record was written by commit 621a58c's code; every later tree must
give the same floats (compared exactly, as hex). To regenerate it (only when a change of the numbers is intended
and explained in the commit):

    PYTHONPATH=src python tests/test_golden.py --write

A different torch version or CPU kernel path (``torch.backends.cpu.get_cpu_capability()``) may round differently:
the record names both, and the test compares only where they match (it says so when skipped).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

RECORD = Path(__file__).parent / "data" / "golden_reference_losses.json"
STEPS = 12


def environment() -> dict:
    return {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def reference_losses(work: Path) -> dict[str, str]:
    """Train the scaled-down reference recipe in ``work``; every step's loss as a hex float."""
    from gpt2forge.config import load_config
    from gpt2forge.data.shards import write_shard
    from gpt2forge.train.trainer import train

    data = work / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 50257, 997)
    for i, n in enumerate([20000, 200000]):
        tokens = np.resize(pattern, n)
        noise = rng.random(n) < 0.3
        tokens[noise] = rng.integers(0, 50257, noise.sum())
        write_shard(data / f"synthetic_{'val' if i == 0 else 'train'}_{i:06d}.bin", tokens.astype(np.uint16))
    overrides = {
        "model.preset": "tiny", "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64, "model.block_size": 64,
        "train.seq_len": 64, "train.micro_batch_size": 4, "train.total_batch_tokens": 512, "train.max_steps": STEPS,
        "train.device": "cpu", "train.precision": "fp32", "train.compile": "false",
        "optim.warmup_steps": 5, "optim.decay_steps": STEPS, "optim.lr": 3e-3, "optim.min_lr": 3e-4,
        "data.dir": data, "data.shuffle": "true", "log.out_dir": work / "out", "log.run_name": "ref", "log.every": 1,
        "eval.val_every": 0, "eval.hellaswag_every": 0, "eval.sample_every": 0, "checkpoint.every": 0,
    }
    config = load_config("gpt2-124m-fineweb-edu-10b", [f"--{k}={v}" for k, v in overrides.items()])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(config)
    finally:
        torch.set_num_threads(threads)
    return {str(step): float(loss).hex() for step, loss in sorted(result.losses.items())}


def test_the_reference_recipe_reproduces_its_golden_losses(tmp_path):
    import pytest

    record = json.loads(RECORD.read_text())
    if record["environment"] != environment():
        pytest.skip(f"the record was made with {record['environment']}, this is {environment()}: rounding may differ; "
                    "regenerate with: PYTHONPATH=src python tests/test_golden.py --write")
    assert reference_losses(tmp_path) == record["losses"]


if __name__ == "__main__":
    import subprocess
    import tempfile

    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        losses = reference_losses(Path(tmp))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    RECORD.write_text(json.dumps({"what": __doc__.splitlines()[0], "written_at_commit": commit, "steps": STEPS,
                                  "environment": environment(), "losses": losses}, indent=2) + "\n")
    print(f"{len(losses)} losses written to {RECORD}")
