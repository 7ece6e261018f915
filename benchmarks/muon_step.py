"""Muon's optimizer step on the GPT-2 124M modern model's hidden matrices: the per-matrix loop of an earlier revision
(default 621a58c, read with ``git show``) against today's batched step (issue 17), side by side, on the CPU.

Contenders, built on the same weights and fed the same gradients, then timed in alternation round after round so
that a burst of foreign load hits them alike (one step per block; every block records how many cores other
processes kept busy, and medians are over the quiet rounds when there are any):

- **before**: ``optim/muon.py`` of ``--base``, Newton–Schulz ``jordan5`` (the only one it has);
- **after**: today's ``Muon`` with the same settings: its results must be bit-identical to before's (checked on
  every weight and momentum buffer after the last round, and recorded);
- **after, track3**: today's with the 124M recipe's Newton–Schulz, (2, −1.5, 0.5) × 12 (2.4× the matmuls);
- **after, compiled** (``--compile``): today's with the iteration through torch.compile on the CPU, to show
  whether eager is the right CPU default (the first step, compiling, is not timed).

Beside the times: the aten ops one step issues (view ops left out; each is at least one kernel launch on a GPU,
a ``_foreach`` op one launch per ~hundreds of tensors), and how many of them read a value back to the host
(``_local_scalar_dense``, what ``.item()`` and ``if tensor`` run): the sync-free claim, counted.

Usage: ``python benchmarks/muon_step.py [--base 621a58c] [--rounds 3] [--compile]`` (on 2 idle cores about
4 minutes without ``--compile``); results to ``benchmarks/results/muon-step-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2forge.bench.measure import QUIET_CORES, spread, timed
from gpt2forge.device import hardware_summary, library_versions
from gpt2forge.files import atomic_write_json, atomic_write_text
from gpt2forge.models import build_model, make_config, parameter_roles
from gpt2forge.optim.muon import Muon

ROOT = Path(__file__).resolve().parents[1]
HYPER = {"lr": 0.025, "momentum": 0.95, "weight_decay": 0.05}  # the 124M recipe's Muon settings


def base_module(rev: str):
    """``optim/muon.py`` as it was at ``rev``, imported from a temporary file (it imports only torch)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/gpt2forge/optim/muon.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "muon_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("muon_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def matrix_shapes() -> list[tuple[int, ...]]:
    """The shapes Muon takes in the 124M modern model, in its parameter order (built on the meta device)."""
    with torch.device("meta"):
        model = build_model(make_config("modern", "gpt2"))
    params = dict(model.named_parameters())
    return [tuple(params[name].shape) for name, role in parameter_roles(model).items() if role == "matrix"]


class OpCounter(TorchDispatchMode):
    """Counts the non-view aten ops dispatched, and the host reads among them."""

    def __init__(self) -> None:
        super().__init__()
        self.ops, self.host_reads = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops += 1
            self.host_reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="621a58c", help="the revision whose optim/muon.py is 'before'")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per contender")
    parser.add_argument("--compile", action="store_true", help="also time the iteration compiled on the CPU")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    shapes = matrix_shapes()
    torch.manual_seed(0)
    weights = [torch.randn(s) * 0.02 for s in shapes]
    grads = [torch.randn(s) for s in shapes]  # the same every step: only the time and the arithmetic matter
    base = base_module(args.base)
    makers = {
        "before": lambda ps: base.Muon(ps, **HYPER),
        "after": lambda ps: Muon(ps, ns="jordan5", **HYPER),
        "after, track3": lambda ps: Muon(ps, ns="track3", **HYPER),
    }
    if args.compile:
        makers["after, compiled"] = lambda ps: Muon(ps, ns="jordan5", compile=True, **HYPER)
    contenders = {}
    for name, make in makers.items():
        params = [w.clone().requires_grad_() for w in weights]
        for p, g in zip(params, grads):
            p.grad = g
        contenders[name] = (params, make(params))

    print(f"{len(shapes)} matrices, {sum(w.numel() for w in weights) / 1e6:.1f}M parameters", flush=True)
    counts, first = {}, {}
    for name, (_, opt) in contenders.items():  # the first step allocates the state (and compiles): timed apart
        start = time.perf_counter()
        opt.step()
        first[name] = 1000 * (time.perf_counter() - start)
        counts[name] = {"ops": None, "host_reads": None}
        if not getattr(opt, "compile", False):  # a dispatch mode would stop torch.compile: count the eager ones
            counter = OpCounter()
            with counter:
                opt.step()
            counts[name] = {"ops": counter.ops, "host_reads": counter.host_reads}
        else:
            opt.step()  # the same number of steps as the others
        print(f"{name}: first step {first[name]:.0f} ms, {counts[name]['ops']} ops, "
              f"{counts[name]['host_reads']} host reads", flush=True)
    timings = {name: [] for name in contenders}
    for r in range(args.rounds):
        for name, (_, opt) in (contenders.items() if r % 2 == 0 else reversed(contenders.items())):
            timings[name].append(timed(opt.step, 1, torch.device("cpu")))
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1][0]:.0f} ms" for n, t in timings.items()), flush=True)

    def same(a: str, b: str) -> bool:
        (pa, oa), (pb, ob) = contenders[a], contenders[b]
        return all(torch.equal(x, y) and torch.equal(oa.state[x]["momentum_buffer"], ob.state[y]["momentum_buffer"])
                   for x, y in zip(pa, pb))

    def max_diff(a: str, b: str) -> float:
        return max(float((x - y).detach().abs().max()) for x, y in zip(contenders[a][0], contenders[b][0]))

    rows = {name: {**spread(timings[name]), "first_ms": round(first[name], 1), **counts[name]} for name in contenders}
    result = {
        "what": "Muon optimizer step on the GPT-2 124M modern model's hidden matrices (CPU, fp32)",
        "command": "python benchmarks/muon_step.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base": args.base, "matrices": len(shapes), "parameters": sum(w.numel() for w in weights),
        "settings": HYPER, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "hardware": hardware_summary("cpu"), "versions": library_versions(), "quiet_threshold_cores": QUIET_CORES,
        "bit_identical_to_before": same("before", "after"),
        "compiled_max_abs_diff": max_diff("after", "after, compiled") if args.compile else None,
        "rows": rows,
    }
    out = Path(args.out)
    atomic_write_json(out / "muon-step-cpu.json", result)
    atomic_write_text(out / "muon-step-cpu.md", report(result))
    print(report(result))


def report(r: dict) -> str:
    before = r["rows"]["before"]["median"]
    lines = [
        f"# Muon step, GPT-2 124M modern model's matrices ({r['matrices']} matrices, {r['parameters'] / 1e6:.1f}M "
        "parameters), CPU fp32",
        "",
        f"`{r['command']}` — {r['date']}; {r['hardware'].get('cpu', 'CPU')}, {r['threads']} threads, torch "
        f"{r['versions'].get('torch')}; load average {', '.join(f'{x:.1f}' for x in r['load_average'])}.",
        f"Settings: lr {r['settings']['lr']}, momentum {r['settings']['momentum']}, weight decay "
        f"{r['settings']['weight_decay']}, Nesterov; 'before' is `optim/muon.py` at {r['base']}.",
        "",
        "| step | median ms (quiet/all) | min–max ms | vs before | first step ms | aten ops per step | host reads |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in r["rows"].items():
        ops = "n/a (compiled) | n/a" if row["ops"] is None else f"{row['ops']} | {row['host_reads']}"
        lines.append(f"| {name} | {row['median']:.0f} ({row['quiet']}/{row['n']}) | {row['min']:.0f}–{row['max']:.0f} "
                     f"| {before / row['median']:.2f}× | {row['first_ms']:.0f} | {ops} |")
    lines += [
        "",
        f"After is bit-identical to before (every weight and momentum buffer, after every step): "
        f"**{r['bit_identical_to_before']}**."
        + (f" Compiled on the CPU vs eager: max |Δweight| {r['compiled_max_abs_diff']:.1e}."
           if r["compiled_max_abs_diff"] is not None else ""),
        "",
        "Rounds count as quiet when other processes kept fewer than "
        f"{r['quiet_threshold_cores']} cores busy; the median is over those when there are any. On a CPU the step is "
        "the Newton–Schulz matmuls (~1.6 TFLOP per step for jordan5), so batching and foreach ops change little "
        "here; what they remove is per-matrix launches — the ops column — which is what a GPU step pays for.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
