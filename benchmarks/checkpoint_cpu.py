"""Sharded, asynchronous checkpoints against full ones, on CPUs (gloo), 2-process FSDP2 runs of a GPT-2 preset.

Two questions (issue 21):

1. **Host memory of a resume**, peak RSS per rank (``ru_maxrss``) of a 2-process FSDP2 launch that resumes and
   trains nothing (``train.max_steps`` = the checkpoint's step: the Trainer builds, shards, loads and stops):
   - *before*: the base revision's code (``--base``, exported with ``git archive``), where every rank
     ``torch.load``s the whole ``optimizer.pt`` and reads the whole ``model.safetensors``;
   - *full*: this tree, a full checkpoint read by rank 0 alone and broadcast (``broadcast_from_rank0``);
   - *sharded*: this tree, each rank reading its own shards (DCP);
   - and, for scale, a *fresh* launch of the same run (no checkpoint): what building and sharding the model costs.
2. **Time the training loop is blocked by a save**: the same run trains ``--steps`` steps with a checkpoint
   every ``--every``, once with ``checkpoint.format=full`` (gathered to rank 0, written synchronously) and once
   with ``sharded`` (``async_save``: staged to host memory, written by a background thread). Blocked = time in
   ``Trainer.save_checkpoint`` (for the sharded format it includes waiting for the previous save), and the wait for
   the last one at the end of the run (``finish_saving``); the step times say what the background write costs
   the steps it overlaps (on a 2-core machine it competes with them for the cores).

    python benchmarks/checkpoint_cpu.py                          # the 350M preset (gpt2-medium), base d85d114
    python benchmarks/checkpoint_cpu.py --preset gpt2 --base d85d114

Results: ``benchmarks/results/checkpoint-cpu.{json,md}`` (another preset: ``checkpoint-cpu-<preset>.*``), with the
machine, its load and free memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEQ = 64


def overrides(args, data: Path, out: Path, **extra) -> list[str]:
    settings = {
        "model.arch": "gpt2", "model.preset": args.preset, "data.dir": data, "log.out_dir": out,
        "log.run_name": "run", "train.distributed": "fsdp", "train.device": "cpu", "train.precision": "fp32",
        "train.compile": False, "train.micro_batch_size": 1, "train.seq_len": SEQ, "train.total_batch_tokens": 2 * SEQ,
        "train.max_steps": 1, "optim.warmup_steps": 1, "eval.val_every": 0, "eval.hellaswag_every": 0,
        "eval.sample_every": 0, "checkpoint.every": 0, "checkpoint.keep_last": 2, "log.every": 1,
    }
    settings.update(extra)
    return [f"--{k}={v}" for k, v in settings.items()]


# ------------------------------------------------------------------ the ranks' side (under torchrun)
def worker(mode: str, report: Path, config_args: list[str]) -> None:
    import torch

    from gpt2forge.config import load_config
    from gpt2forge.train.trainer import Trainer

    torch.set_num_threads(1)
    config = load_config(None, config_args)
    t0 = time.perf_counter()
    trainer = Trainer(config, resume="auto" if mode == "resume" else None)
    row = {"rank": int(os.environ.get("RANK", "0")), "construct_s": time.perf_counter() - t0}
    if mode == "train":
        blocked, real = [], trainer.save_checkpoint

        def timed(*a, **k):
            t = time.perf_counter()
            real(*a, **k)
            blocked.append(time.perf_counter() - t)

        trainer.save_checkpoint = timed
        end_wait = []
        if hasattr(trainer, "finish_saving"):
            real_finish = trainer.finish_saving

            def timed_finish():
                t = time.perf_counter()
                real_finish()
                end_wait.append(time.perf_counter() - t)

            trainer.finish_saving = timed_finish
        t = time.perf_counter()
        trainer.run()
        row.update(run_s=time.perf_counter() - t, blocked_s=blocked, end_wait_s=sum(end_wait))
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.close()
    with open(report, "a") as f:
        f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------ the driver
def launch(src: Path, mode: str, config_args: list[str], work: Path, label: str) -> list[dict]:
    report = work / f"{label}.jsonl"
    report.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "worker",
           mode, str(report), "--", *config_args]
    print(f"[{label}] {mode}", flush=True)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=7200)
    if result.returncode:
        raise SystemExit(f"{label} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    rows = sorted((json.loads(line) for line in report.read_text().splitlines()), key=lambda r: r["rank"])
    print(f"[{label}] " + "; ".join(f"rank {r['rank']}: peak {r['peak_rss_mib']:,.0f} MiB" for r in rows), flush=True)
    return rows


def step_ms(run_dir: Path) -> dict[int, float]:
    import csv

    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["step_ms"]) for r in csv.DictReader(f) if r.get("step_ms")}


def machine() -> dict:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average": os.getloadavg(),
            "mem_available_gib": int(meminfo["MemAvailable"].split()[0]) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt2-medium", help="GPT-2 preset (gpt2-medium = the 350M)")
    parser.add_argument("--base", default="d85d114", help="the revision before sharded checkpoints ('before')")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="checkpoint-cpu-"))
    base_commit = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    try:
        base = work / "base"
        base.mkdir()
        archive = subprocess.run(["git", "archive", base_commit, "src"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        src = ROOT / "src"
        data = work / "data"
        write_data(src, data)
        start = machine()
        # 1. the checkpoints to resume: one step, saved full and sharded
        made = {}
        for fmt in ("full", "sharded"):
            made[fmt] = launch(src, "train", overrides(args, data, work / fmt, **{"checkpoint.format": fmt}), work,
                               f"make-{fmt}")
        # 2. resume them (nothing to train), and a fresh launch for scale
        resume = {
            "before (base: every rank reads the full checkpoint)": (base / "src", work / "full", {}),
            "full (rank 0 reads, broadcasts)": (src, work / "full", {"checkpoint.format": "full"}),
            "sharded (each rank its shards)": (src, work / "sharded", {"checkpoint.format": "sharded"}),
        }
        memory = {}
        for label, (tree, out, extra) in resume.items():
            memory[label] = launch(tree, "resume", overrides(args, data, out, **extra), work, "resume")
        fresh = launch(src, "fresh", overrides(args, data, work / "fresh"), work, "fresh")
        memory["fresh start (no checkpoint), for scale"] = fresh
        # 3. the time a save blocks the loop
        timing = {}
        for fmt in ("full", "sharded"):
            out = work / f"timing-{fmt}"
            rows = launch(src, "train", overrides(args, data, out, **{
                "checkpoint.format": fmt, "train.max_steps": args.steps, "checkpoint.every": args.every,
                "optim.warmup_steps": 1}), work, f"timing-{fmt}")
            timing[fmt] = {"ranks": rows, "step_ms": step_ms(out / "run")}
        sizes = {fmt: sum(p.stat().st_size for p in (work / fmt / "run" / "step-000001").rglob("*") if p.is_file())
                 for fmt in ("full", "sharded")}
        record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": head,
                  "base": base_commit, "preset": args.preset, "seq_len": SEQ, "steps": args.steps,
                  "every": args.every, "machine_at_start": start, "machine_at_end": machine(),
                  "checkpoint_bytes": sizes, "made": made, "resume_peak_rss": memory, "save_timing": timing,
                  "command": " ".join([Path(sys.executable).name, *sys.argv])}
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = "checkpoint-cpu" + ("" if args.preset == "gpt2-medium" else f"-{args.preset}")
        (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(markdown(record))
        print(markdown(record))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def write_data(src: Path, data: Path) -> None:
    """Random tokens over GPT-2's vocabulary: a val shard and a train shard (only their shapes matter here)."""
    code = ("import sys, numpy as np, pathlib; from gpt2forge.data.shards import write_shard; d = pathlib.Path("
            "sys.argv[1]); d.mkdir(parents=True); rng = np.random.default_rng(0)\n"
            "for i, split in enumerate(['val', 'train']): write_shard(d / f'bench_{split}_{i:06d}.bin', "
            "rng.integers(0, 50257, 200_000).astype(np.uint16))")
    subprocess.run([sys.executable, "-c", code, str(data)], env={**os.environ, "PYTHONPATH": str(src)}, check=True)


def markdown(r: dict) -> str:
    gib = 2**30
    m0 = r["machine_at_start"]
    lines = [
        f"# Sharded vs full checkpoints on CPU: GPT-2 preset `{r['preset']}`, 2-process FSDP2 (gloo)", "",
        f"{r['date']}, commit {r['commit'][:10]} (before = {r['base'][:10]}), {m0['cores']} cores, torch "
        f"{m0['torch']}, load average at start {m0['load_average'][0]:.1f}, {m0['mem_available_gib']:.1f} GiB "
        f"available at start. Checkpoint of one step: full {r['checkpoint_bytes']['full'] / gib:.2f} GiB, sharded "
        f"{r['checkpoint_bytes']['sharded'] / gib:.2f} GiB. `{r['command']}`", "",
        "## Peak host memory of resuming (RSS per rank, MiB)", "",
        "| launch | rank 0 | rank 1 |", "|---|---:|---:|",
    ]
    for label, rows in r["resume_peak_rss"].items():
        lines.append(f"| {label} | " + " | ".join(f"{x['peak_rss_mib']:,.0f}" for x in rows) + " |")
    lines += ["", f"## Training loop blocked by a save ({r['steps']} steps, a checkpoint every {r['every']}; "
              "seconds, rank 0)", "",
              "| format | each save (blocked) | wait at the end | median step ms | steps ms (all) |",
              "|---|---|---:|---:|---|"]
    for fmt, t in r["save_timing"].items():
        rank0 = t["ranks"][0]
        steps = sorted(t["step_ms"].items())
        median = sorted(v for _, v in steps)[len(steps) // 2]
        lines.append(f"| {fmt} | {', '.join(f'{b:.2f}' for b in rank0['blocked_s'])} | {rank0['end_wait_s']:.2f} | "
                     f"{median:,.0f} | {', '.join(f'{v:,.0f}' for _, v in steps)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], Path(sys.argv[3]), sys.argv[5:])
    else:
        main()
