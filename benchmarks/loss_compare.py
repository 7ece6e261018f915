"""Per-step training losses of the reference recipe at two git revisions, compared bit for bit.

The reference recipe (``gpt2-124m-fineweb-edu-10b``: GPT-2, vocab padded to 50304, AdamW with GPT-2's decay
groups, warmup + cosine, grad clip 1.0, gradient accumulation) must keep its losses bit-identical through every
refactor. This script runs it, scaled down to a CPU (a 2-layer model, 64-token sequences, synthetic shards over
GPT-2's vocabulary), in a worktree of ``--base`` and in the current tree, and compares the exact float losses of
every step. Nothing is tuned: the recipe file of each revision is loaded as it is, only the size and the data
directory are overridden (and ``data.shuffle``, so that both read the same order whatever the recipe says).

    python benchmarks/loss_compare.py --base 9fc4d2f            # exit 1 when any step differs
    python benchmarks/loss_compare.py --base main --compile     # the same with torch.compile on (1 thread)

Results (each step's loss as a hex float, both revisions, verdict) go to ``benchmarks/results/loss-compare.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside the tree under test (PYTHONPATH=<tree>/src), so it may only use APIs every revision has.
SNIPPET = r"""
import json, sys
import numpy as np
from gpt2forge.config import load_config
from gpt2forge.data.shards import write_shard
from gpt2forge.train.trainer import train

data, out, steps, compile_ = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
import pathlib
d = pathlib.Path(data)
if not d.exists():
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 50257, 997)
    for i, n in enumerate([20000, 200000]):
        tokens = np.resize(pattern, n)
        noise = rng.random(n) < 0.3
        tokens[noise] = rng.integers(0, 50257, noise.sum())
        split = "val" if i == 0 else "train"
        write_shard(d / f"synthetic_{split}_{i:06d}.bin", tokens.astype(np.uint16))
overrides = {
    "model.preset": "tiny", "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 64, "model.block_size": 64,
    "train.seq_len": 64, "train.micro_batch_size": 4, "train.total_batch_tokens": 512, "train.max_steps": steps,
    "train.device": "cpu", "train.precision": "fp32", "train.compile": compile_,
    "optim.warmup_steps": 5, "optim.decay_steps": steps, "optim.lr": 3e-3, "optim.min_lr": 3e-4,
    "data.dir": data, "data.shuffle": "true", "log.out_dir": out, "log.run_name": "ref", "log.every": 1,
    "eval.val_every": 0, "eval.hellaswag_every": 0, "eval.sample_every": 0, "checkpoint.every": 0,
}
config = load_config("gpt2-124m-fineweb-edu-10b", [f"--{k}={v}" for k, v in overrides.items()])
result = train(config)
print("LOSSES=" + json.dumps({str(s): float(v).hex() for s, v in sorted(result.losses.items())}))
"""


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def losses_of(tree: Path, data: Path, work: Path, steps: int, compile_: bool) -> dict[str, str]:
    # Inductor's CPU kernels split reductions across threads non-deterministically (the same tree compiled twice
    # differs by an ulp in a step's loss now and then with 2 threads, never with 1): compiled runs use one thread.
    threads = "1" if compile_ else os.environ.get("OMP_NUM_THREADS", "2")
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": threads}
    proc = subprocess.run([sys.executable, "-c", SNIPPET, str(data), str(work), str(steps), str(compile_).lower()],
                          capture_output=True, text=True, env=env, cwd=work)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("LOSSES=")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"training in {tree} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("LOSSES="))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True,
                        help="git revision to compare against (e.g. a commit before a refactor)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compile", action="store_true", help="train with torch.compile (both revisions)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loss-compare.json"))
    args = parser.parse_args()
    base_sha, head_sha = git("rev-parse", args.base), git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    with tempfile.TemporaryDirectory(prefix="loss-compare-") as tmp:
        tmp = Path(tmp)
        base_tree = tmp / "base"
        git("worktree", "add", "--detach", str(base_tree), base_sha)
        try:
            (tmp / "w-base").mkdir()
            (tmp / "w-head").mkdir()
            base = losses_of(base_tree, tmp / "data", tmp / "w-base", args.steps, args.compile)
            head = losses_of(ROOT, tmp / "data", tmp / "w-head", args.steps, args.compile)
        finally:
            git("worktree", "remove", "--force", str(base_tree))
    differing = [s for s in base if head.get(s) != base[s]] + [s for s in head if s not in base]
    result = {
        "what": "per-step train losses of the reference recipe (scaled down, CPU, fp32), two revisions",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": base_sha, "head": head_sha + (" + uncommitted changes" if dirty else ""),
        "steps": args.steps, "compile": args.compile, "bit_identical": not differing, "differing_steps": differing,
        "losses": {s: {"base": base[s], "head": head.get(s), "value": float.fromhex(base[s])} for s in base},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    verdict = "bit-identical" if not differing else f"DIFFERENT at steps {', '.join(differing[:10])}"
    print(f"{args.steps} steps, base {base_sha[:10]} vs head {head_sha[:10]}{' (dirty)' if dirty else ''}: {verdict}")
    print(f"written to {out}")
    return 0 if not differing else 1


if __name__ == "__main__":
    sys.exit(main())
