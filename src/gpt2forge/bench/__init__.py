"""``gpt2forge bench``: where the training time goes on this machine, measured side by side.

Sections, all written to ``<--out>/bench-<device>.{json,md}`` (default ``out/bench``) with the hardware, library
versions, the exact command and the machine load:

- **ablation**: one training step (forward, backward, grad clip, AdamW step) on a fixed random batch with
  build-nanogpt's optimizations switched on one after another — fp32 eager with manual attention, + TF32,
  + bf16 autocast, + torch.compile, + flash SDPA, + vocab padded to 50304, + fused AdamW — against the
  published single-A100 figures. Rows this device cannot run are listed with the reason, not dropped.
- **overhead**: the real ``Trainer`` loop (loader over shards, LR schedule, logging, metrics file, accelerate)
  against a bare forward/backward/step loop on the same model, optimizer and batches.
- **data**: ``prepare`` tokenization throughput (``benchmarks/bench_prepare.py``) and the loader's time to
  fetch a B=64, T=1024 batch, next to the GPU step it has to keep up with.
- **memory** (GPUs): peak memory and the largest micro-batch that fits, per GPT-2 size.

Machines are often shared (CI runners, colleagues' jobs). So the contenders of a comparison are built first
and then timed in alternation, round after round: a burst of foreign load hits them alike and the per-round
medians stay comparable. The load average and the CPU time other processes took are recorded per section.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..device import hardware_summary, library_versions
from ..files import atomic_write_json, atomic_write_text
from .ablation import run_ablation
from .data import run_loader, run_prepare, write_random_shards
from .measure import LoadMeter, device_kind, free_memory
from .memory import run_memory
from .options import SECTIONS, TARGETS, BenchOptions, resolve_options
from .overhead import run_overhead
from .report import to_markdown

__all__ = ["SECTIONS", "BenchOptions", "resolve_options", "run_bench"]
log = logging.getLogger("gpt2forge.bench")


def run_bench(opts: BenchOptions) -> dict:
    """Run the chosen sections (data first: it forks worker processes before torch starts its threads), write
    ``bench-<device>.{json,md}`` and return the results."""
    device = torch.device(opts.device)
    started = time.monotonic()
    result = {
        "benchmark": "gpt2forge bench", "command": opts.command(), "device_kind": device_kind(device),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "hardware": hardware_summary(device),
        "versions": library_versions(), "settings": {**asdict(opts), "out": str(opts.out)}, "targets": TARGETS,
        "load": {},
    }
    with tempfile.TemporaryDirectory(prefix="gpt2forge-bench-") as tmp:
        tmp = Path(tmp)
        data_dir = None
        if {"data", "overhead"} & set(opts.sections):
            data_dir = write_random_shards(tmp / "shards", *((2, 200_000) if opts.quick else (4, 1_000_000)))
        order = [s for s in ("data", "ablation", "overhead", "memory") if s in opts.sections]
        for section in order:
            log.info("== %s", section)
            with LoadMeter() as load:
                if section == "data":
                    result["data"] = {"prepare": run_prepare(opts), "loader": run_loader(opts, data_dir)}
                elif section == "ablation":
                    result["ablation"] = run_ablation(opts, device)
                elif section == "overhead":
                    result["overhead"] = run_overhead(opts, device, data_dir, tmp / "runs")
                else:
                    result["memory"] = run_memory(opts, device)
            result["load"][section] = load.record
            free_memory(device)
    result["seconds"] = round(time.monotonic() - started, 1)
    write_results(result, opts)
    return result


def result_stem(opts: BenchOptions, kind: str) -> str:
    """bench-<device>, plus -quick or the chosen sections, so a partial run never overwrites a full record."""
    stem = f"bench-{kind}"
    if opts.quick:
        stem += "-quick"
    if tuple(opts.sections) != SECTIONS:
        stem += "-" + "-".join(opts.sections)
    return stem


def write_results(result: dict, opts: BenchOptions) -> None:
    opts.out.mkdir(parents=True, exist_ok=True)
    stem = opts.out / result_stem(opts, result["device_kind"])
    atomic_write_json(stem.with_suffix(".json"), result, indent=1)
    atomic_write_text(stem.with_suffix(".md"), to_markdown(result))
    result["files"] = [str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))]
    log.info("wrote %s.{json,md}", stem)
