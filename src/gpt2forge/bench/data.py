"""Data throughput: ``prepare``'s tokenization (``benchmarks/bench_prepare.py``) and the loader's batch fetch."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .measure import VOCAB, failure, spread, timed
from .options import TARGET_TOKENS_PER_S, BenchOptions

log = logging.getLogger("gpt2forge.bench")


def write_random_shards(directory: Path, n_shards: int, tokens_per_shard: int, vocab: int = VOCAB) -> Path:
    from ..data.shards import write_shard

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_shards):
        write_shard(directory / f"bench_train_{i:06d}.bin", rng.integers(0, vocab, tokens_per_shard, dtype=np.uint16))
    return directory


def run_loader(opts: BenchOptions, data_dir: Path, batch_size: int = 64, seq_len: int = 1024) -> dict:
    """TokenLoader.batch at the reference run's micro-batch, shuffled, over shards already in the page cache."""
    from ..data.loader import TokenLoader

    loader = TokenLoader(data_dir, batch_size, seq_len, seed=0, shuffle=True)
    loader.batch(0)
    n = 2 if opts.quick else 10

    def fetch(first: int) -> None:
        for i in range(n):
            loader.batch(first + i)

    timings = []
    for r in range(opts.repeats):
        ms, others = timed(partial(fetch, 1 + r * n), 1, torch.device("cpu"))
        timings.append((ms / n, others))
    timing = spread(timings)
    gpu_step_ms = 1000 * batch_size * seq_len / TARGET_TOKENS_PER_S
    return {
        "batch_size": batch_size, "seq_len": seq_len, "tokens_in_shards": loader.sequences.total * seq_len,
        "shards": len(loader.sequences.paths), "batches_per_round": n, "rounds": opts.repeats, "ms_per_batch": timing,
        "gpu_step_ms": round(gpu_step_ms, 1),
        "gpu_step": f"GPT-2 124M micro-step of {batch_size}x{seq_len} tokens at the H100 target "
                    f"({TARGET_TOKENS_PER_S:,} tokens/s)",
        "pct_of_gpu_step": 100 * timing["median"] / gpu_step_ms,
        "note": "the loader prepares the next batch on a thread while the step runs, so a fetch shorter than the "
                "step is hidden",
    }


def find_prepare_script() -> Path | None:
    """benchmarks/bench_prepare.py of the source checkout (it is not part of the installed package)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        script = root / "benchmarks" / "bench_prepare.py"
        if script.is_file():
            return script
    return None


def load_prepare_module(script: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_prepare", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_prepare(opts: BenchOptions) -> dict:
    """bench_prepare's results and its own markdown: measured now, or in --quick mode the recorded ones."""
    script = find_prepare_script()
    if script is None:
        return {"reason": "benchmarks/bench_prepare.py not found: run from a source checkout"}
    recorded = script.parent / "results" / "prepare-cpu.json"
    if opts.quick:
        out = {"reason": "skipped in --quick mode (tokenizes the corpus several times, about a minute)"}
        with contextlib.suppress(OSError, ValueError):
            out["ratios"] = json.loads(recorded.read_text())["ratios"]
            out["recorded_from"] = os.path.relpath(recorded.with_suffix(".md"))
        return out
    repeats = min(opts.repeats, 3)
    log.info("data: %s with %d repeats", script, repeats)
    try:
        module = load_prepare_module(script)
        result = module.run_prepare_benchmark(repeats=repeats)
    except Exception as error:
        return {"reason": failure(error)}
    out = {"measured_with": f"run_prepare_benchmark(repeats={repeats}) of {script.name}, in this run",
           "ratios": result.get("ratios"), "result": result}
    try:
        out["markdown"] = module.to_markdown(result)
    except Exception as error:
        out["markdown_error"] = failure(error)
    return out
