"""The GPU figures, in one run of a few minutes: what ``benchmarks/gpu_check.sh`` runs after the CUDA tests.

Sections, each under its own time budget (a section that would not fit is skipped with the reason, and the
results are rewritten after every section, so a run cut short still leaves what it measured):

- **recipes**: the real ``Trainer`` on synthetic shards for the reference recipe (``gpt2-124m-fineweb-edu-10b``:
  bf16, compile, flash, fused AdamW) and the modern one (``gpt2-124m-modern-fineweb-edu``: Muon + AdamW), one
  micro-step per optimizer step: tokens/s, MFU and peak memory over ~30 timed steps, against a bare compiled
  loop (forward, backward, clip, optimizer) on the same model, optimizers and batches — the trainer's overhead.
- **ablation**: ``gpt2forge bench``'s optimization ablation for GPT-2 124M at T=1024 (fp32 eager → … → fused
  AdamW), the cumulative speed-up against build-nanogpt's ~11×.
- **memory**: one 124M step's peak memory with the reference and the chunked loss, and the largest micro-batch
  that fits per GPT-2 size.

``--dry-run`` runs every section on the CPU with a tiny model and a few steps, so CI keeps this script working.
Results: ``OUT/bench-cuda-<gpu>.{json,md}`` (``bench-cpu-dry-run`` for a dry run).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

from gpt2forge.bench import BenchOptions
from gpt2forge.bench.ablation import run_ablation
from gpt2forge.bench.data import write_random_shards
from gpt2forge.bench.measure import bare_step, device_kind, free_memory, synchronize
from gpt2forge.bench.memory import run_memory
from gpt2forge.bench.report import ablation_markdown, memory_markdown
from gpt2forge.config import load_config
from gpt2forge.device import autocast, hardware_summary, library_versions
from gpt2forge.files import atomic_write_json, atomic_write_text
from gpt2forge.train.trainer import Trainer

RECIPES = ("gpt2-124m-fineweb-edu-10b", "gpt2-124m-modern-fineweb-edu")
TARGETS = {"mfu": 0.50, "ablation_speedup": 11.0, "overhead_pct": 10.0}
log = logging.getLogger("gpt2forge.gpu_check")


def recipe_throughput(recipe: str, data: Path, work: Path, device: torch.device, dry: bool, steps: int) -> dict:
    """Trainer steps vs bare compiled steps of one recipe: tokens/s, MFU, peak memory, overhead."""
    batch, seq_len = (2, 64) if dry else (64, 1024)
    overrides = {"data.dir": data, "log.out_dir": work, "log.run_name": recipe, "train.max_steps": 1_000_000,
                 "train.micro_batch_size": batch, "train.seq_len": seq_len, "train.total_batch_tokens": batch * seq_len,
                 "eval.val_every": 0, "eval.hellaswag_every": 0, "eval.sample_every": 0, "checkpoint.every": 0,
                 "log.every": 1_000_000}
    if dry:
        overrides.update({"model.preset": "tiny", "model.n_layer": 2, "train.device": "cpu", "train.compile": False,
                          "train.precision": "fp32"})
    config = load_config(recipe, [f"--{k}={v}" for k, v in overrides.items()])
    trainer = Trainer(config)
    try:
        started = time.perf_counter()
        trainer.run(until=3)  # compile and warm up
        synchronize(device)
        warmup_s = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start_step, started = trainer.step, time.perf_counter()
        trainer.run(until=start_step + steps)
        synchronize(device)
        trainer_s = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        batches = [tuple(t.to(device) for t in trainer.loader.batch(s)) for s in range(start_step, trainer.step)]
        synchronize(device)
        started = time.perf_counter()
        precision = partial(autocast, device, trainer.autocast_dtype)
        for x, y in batches:
            bare_step(trainer.wrapped, trainer.train_model, trainer.optimizers, x, y, precision)
        synchronize(device)
        bare_s = time.perf_counter() - started
        tokens = steps * config.train.total_batch_tokens
        tps, bare_tps = tokens / trainer_s, tokens / bare_s
        mfu = trainer.flops_per_token * tps / trainer.peak_flops if trainer.peak_flops else None
        return {
            "recipe": recipe, "params": trainer.model.num_params(), "batch": f"{batch}×{seq_len}", "steps": steps,
            "warmup_s": round(warmup_s, 1), "tokens_per_s": tps, "ms_per_step": 1000 * trainer_s / steps,
            "mfu": mfu, "peak_gib": peak, "bare_tokens_per_s": bare_tps, "overhead_pct": 100 * (bare_tps / tps - 1),
            "precision": {None: "fp32", torch.bfloat16: "bf16 autocast"}[trainer.autocast_dtype],
            "compile": config.train.compile, "loss": config.train.loss,
            "optimizers": list(trainer.optimizers.optimizers),
        }
    finally:
        trainer.close()
        free_memory(device)


def to_markdown(result: dict) -> str:
    hw = result["hardware"]
    lines = [f"# GPU check: {hw.get('gpu', hw.get('device'))}", "",
             f"- when: {result['time']}; {result['seconds']:.0f} s; command: `{result['command']}`",
             f"- torch {result['versions'].get('torch')}, CUDA {hw.get('cuda')}, {hw.get('platform')}",
             f"- targets: MFU ≥ {TARGETS['mfu']:.0%} (GPT-2 124M, H100), ablation speed-up ≥ "
             f"{TARGETS['ablation_speedup']:.0f}× over fp32 eager, trainer within {TARGETS['overhead_pct']:.0f}% of a "
             "bare compiled loop", ""]
    if result.get("dry_run"):
        lines += ["**Dry run on the CPU** (tiny model, few steps): it checks the script, not the GPU.", ""]
    lines += ["## Recipes through the real Trainer (one micro-step per optimizer step)", "",
              "| recipe | params | batch | precision / loss | tokens/s | ms/step | MFU | peak GiB | bare loop tokens/s "
              "| trainer overhead | compile+warm-up s |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["sections"].get("recipes", {}).get("rows", []):
        if "reason" in r:
            lines.append(f"| {r['recipe']} | {r['reason']} |" + " |" * 9)
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['recipe']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['precision']}, {r['loss']} | "
                     f"{r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {mfu} | {peak} | "
                     f"{r['bare_tokens_per_s']:,.0f} | {r['overhead_pct']:+.1f}% | {r['warmup_s']} |")
    for name, render in (("ablation", ablation_markdown), ("memory", memory_markdown)):
        section = result["sections"].get(name)
        if section is None:
            continue
        lines.append("")
        lines += render(section) if "skipped" not in section else [f"## {name}", "", section["skipped"]]
    skipped = [f"{k}: {v['skipped']}" for k, v in result["sections"].items() if isinstance(v, dict) and "skipped" in v]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory for bench-cuda-<gpu>.{json,md}")
    parser.add_argument("--dry-run", action="store_true", help="the same sections on the CPU, tiny and quick")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all sections (default 420)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per recipe")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; use --dry-run on a CPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    started, deadline = time.monotonic(), time.monotonic() + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    # bench-cuda-<gpu>, not bench-<gpu>: `gpt2forge bench --device cuda` writes that one, and both get committed
    stem = args.out / ("bench-cpu-dry-run" if args.dry_run else f"bench-cuda-{device_kind(device)}")
    result = {"benchmark": "gpt2forge GPU check", "command": " ".join(["python", *sys.argv]), "dry_run": args.dry_run,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "hardware": hardware_summary(device),
              "versions": library_versions(), "targets": TARGETS, "sections": {}}
    steps = 3 if args.dry_run else args.steps
    opts = BenchOptions(preset="tiny" if args.dry_run else "gpt2", device=device.type,
                        batch_size=2 if args.dry_run else 16, seq_len=64 if args.dry_run else 1024,
                        steps=1 if args.dry_run else 10, repeats=1 if args.dry_run else 3,
                        sections=("ablation", "memory"), quick=args.dry_run, out=args.out, profile=False)

    def save() -> None:
        result["seconds"] = time.monotonic() - started
        atomic_write_json(stem.with_suffix(".json"), result, indent=1)
        atomic_write_text(stem.with_suffix(".md"), to_markdown(result))

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        data = write_random_shards(Path(tmp) / "shards", 2, 200_000 if args.dry_run else 20_000_000)
        sections = [
            ("recipes", 0.45, lambda: {"rows": [recipe_throughput(r, data, Path(tmp), device, args.dry_run, steps)
                                                for r in RECIPES]}),
            ("ablation", 0.35, lambda: run_ablation(opts, device)),
            ("memory", 0.20, lambda: run_memory(opts, device)),
        ]
        for name, share, section in sections:
            left = deadline - time.monotonic()
            if left < share * args.budget * 0.5:
                result["sections"][name] = {
                    "skipped": f"out of time ({left:.0f} s left of the {args.budget:.0f} s budget)"}
                continue
            log.info("== %s (%.0f s left)", name, left)
            try:
                result["sections"][name] = section()
            except Exception as error:
                result["sections"][name] = {"skipped": f"failed: {type(error).__name__}: {error}"}
                traceback.print_exc()
            free_memory(device)
            save()
    save()
    print(to_markdown(result))
    rows = result["sections"].get("recipes", {}).get("rows", [])
    return 0 if rows and all("tokens_per_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
