"""The chunked cross-entropy before and after a change of ``models/loss.py``: graph size under compile, CPU time.

BEFORE is ``models/loss.py`` at ``--base``, loaded from git into a temporary module; AFTER is the current tree's.
Two changes were measured with it (``--name`` keeps their results apart):

- ``chunked-loss-cpu``: BEFORE = 621a58c (an ``autograd.Function`` whose chunk loop torch.compile unrolls into the
  graph, with a ``scatter_add_`` on each fp32 chunk), AFTER = one custom op each way
  (``gpt2forge::chunked_cross_entropy``), its chunks run eagerly for eager callers and as compiled per-chunk
  functions for compiled ones.
- ``chunked-loss-cpu-chunk-size``: BEFORE = 364543f (256 MB chunks everywhere), AFTER = cache-sized chunks (2 MB)
  when running eagerly on a CPU (``--base 364543f --rows 2048 --no-graphs``: the quickstart's micro-batch).

Measured, side by side in one process:

- **graph**: FX nodes of the forward and backward graphs AOTAutograd hands to the compiler, at B·T = 8,192 and
  65,536 rows of 50,304 columns (traced on meta tensors, so nothing is computed), and the seconds the trace takes;
- **time**: CPU fp32 forward+backward of the loss at B·T = ``--rows`` × 50,304, eager and under torch.compile
  (inductor), without and with the soft cap; each contender's first call once (compilation included, inductor's
  on-disk caches off), then ``--rounds`` rounds that run every contender once, the order reversed every other
  round; medians of the rounds in which other processes kept < 0.25 cores busy (of all rounds when none was).

    python benchmarks/chunked_loss.py [--base 621a58c] [--rows 8192] [--rounds 5] [--no-graphs] [--name NAME]

Results: ``benchmarks/results/<name>.{json,md}`` (default ``chunked-loss-cpu``).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch._functorch.config
import torch._inductor.config
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from gpt2forge.bench.measure import LoadMeter, spread, timed
from gpt2forge.device import hardware_summary, library_versions
from gpt2forge.files import atomic_write_json, atomic_write_text
from gpt2forge.models import loss as after

ROOT = Path(__file__).resolve().parents[1]
COLUMNS, VOCAB, CAP = 50304, 50257, 15.0
CAPS = {"no cap": (0.0, "tanh"), "tanh cap 15": (CAP, "tanh"), "algebraic cap 15": (CAP, "algebraic")}


def load_before(rev: str, directory: Path):
    """``models/loss.py`` as of ``rev``, imported as a module of the package (its relative imports resolve). Its
    custom ops are renamed (``gpt2forge_before::…``): registered under the tree's names, they would replace the
    tree's own, and AFTER would time BEFORE's code."""
    source = subprocess.run(["git", "show", f"{rev}:src/gpt2forge/models/loss.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.replace('"gpt2forge::', '"gpt2forge_before::')
    path = directory / f"loss_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("gpt2forge.models._loss_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Dynamo looks the module's globals up by its name
    spec.loader.exec_module(module)
    return module


def forms(module) -> tuple[str, ...]:
    """The soft-cap forms a version of the loss has (before the forms existed: tanh alone)."""
    return getattr(module, "SOFTCAP_FORMS", ("tanh",))


def loss_fn(module, cap: float, form: str):
    """The module's chunked loss at one cap (a version without forms has no form argument: it is tanh)."""
    if len(forms(module)) > 1:
        return lambda x, y: module.chunked_cross_entropy(x, y, VOCAB, cap, form)
    assert form == "tanh"
    return lambda x, y: module.chunked_cross_entropy(x, y, VOCAB, cap)


def variants(before) -> list[tuple[str, str, object, float, str]]:
    """(label, version, module, cap, form): BEFORE and AFTER for what both have, AFTER alone for a new form."""
    out = []
    for label, (cap, form) in CAPS.items():
        for version, module in (("before", before), ("after", after)):
            if form not in forms(module):
                continue
            out.append((label, version, module, cap, form))
    return out


def graph_size(module, cap: float, form: str, rows: int) -> dict:
    """Nodes of the forward and backward graphs torch.compile produces for the loss, traced on meta tensors."""
    counts = {}

    def record(name):
        def compiler(gm, example_inputs):
            counts[name] = len(gm.graph.nodes)
            return make_boxed_func(gm.forward)
        return compiler

    torch._dynamo.reset()
    x = torch.empty(rows, COLUMNS, device="meta", requires_grad=True)
    y = torch.zeros(rows, dtype=torch.long, device="meta")
    fn = torch.compile(loss_fn(module, cap, form), fullgraph=True,
                       backend=aot_autograd(fw_compiler=record("forward"), bw_compiler=record("backward")))
    start = time.perf_counter()
    fn(x, y).backward()
    return {**counts, "total": counts["forward"] + counts["backward"],
            "trace_seconds": round(time.perf_counter() - start, 2)}


def run_graphs(before) -> list[dict]:
    rows = []
    for label, version, module, cap, form in variants(before):
        for n in (8192, 65536):
            rows.append({"loss": label, "version": version, "rows": n, **graph_size(module, cap, form, n)})
            print(f"graph {label:17s} {version:6s} rows={n}: {rows[-1]}", flush=True)
    torch._dynamo.reset()
    return rows


def run_times(before, n_rows: int, rounds: int) -> dict:
    torch.manual_seed(0)
    logits = torch.randn(n_rows, COLUMNS) * 4
    targets = torch.randint(0, VOCAB, (n_rows,))
    x = logits.clone().requires_grad_()
    contenders, first_call, before_results, agreement = {}, {}, {}, {}
    for label, version, module, cap, form in variants(before):
        for mode in ("eager", "compiled"):
            fn = loss_fn(module, cap, form)
            if mode == "compiled":
                fn = torch.compile(fn)

            def step(fn=fn):
                x.grad = None
                value = fn(x, targets)
                value.backward()
                return value.detach(), x.grad

            key = (label, mode, version)
            start = time.perf_counter()
            v1, g1 = step()
            first_call[key] = time.perf_counter() - start
            contenders[key] = step
            print(f"first call {key}: {first_call[key]:.1f} s", flush=True)
            if version == "before":  # kept until AFTER's gradient is there to compare (1.6 GB each)
                before_results[(label, mode)] = v1, g1.clone()
            elif (label, mode) in before_results:
                v0, g0 = before_results.pop((label, mode))
                agreement[f"{label}, {mode}"] = {
                    "bit_identical": bool(torch.equal(v0, v1) and torch.equal(g0, g1)),
                    "loss_rel_diff": abs((v1 - v0) / v0).item(),
                    "grad_max_abs_diff": (g1 - g0).abs().max().item(), "grad_max_abs": g0.abs().max().item()}
    samples = {key: [] for key in contenders}
    order = list(contenders)
    for r in range(rounds):
        for key in order if r % 2 == 0 else order[::-1]:
            samples[key].append(timed(contenders[key], 1, torch.device("cpu")))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{'/'.join(k)} {samples[k][-1][0]:.0f} ms" for k in order),
              flush=True)
    timings = [{"loss": label, "mode": mode, "version": version, "first_call_seconds": round(first_call[key], 2),
                **spread(samples[key])} for key in order for label, mode, version in [key]]
    return {"rows": n_rows, "columns": COLUMNS, "vocab_size": VOCAB, "rounds": rounds, "timings": timings,
            "before_vs_after_values": agreement}


def _graph_table(graph: list[dict]) -> list[str]:
    lines = ["## Graph size under torch.compile (FX nodes AOTAutograd hands to the compiler, forward + backward)", "",
             "| loss | rows | before fwd + bwd | after fwd + bwd | before trace s | after trace s |",
             "|---|---|---|---|---|---|"]
    graphs = {(g["loss"], g["rows"], g["version"]): g for g in graph}
    for (label, rows, version), g in graphs.items():
        if version != "after":
            continue
        b = graphs.get((label, rows, "before"))
        nodes = (lambda x: f"{x['forward']} + {x['backward']} = {x['total']}")
        lines.append(f"| {label} | {rows:,} | {nodes(b) if b else '—'} | {nodes(g)} | "
                     f"{b['trace_seconds'] if b else '—'} | {g['trace_seconds']} |")
    return lines


def markdown(result: dict) -> str:
    t = result["time"]
    lines = [
        f"# Chunked cross-entropy: before (`{result['base']}`) vs after (`{result['head']}`)",
        "",
        f"{result['date']} · `{result['command']}` · before = `{result['base']}`, after = `{result['head']}` · "
        f"{result['hardware']['cpu']}, {result['hardware']['torch_threads']} threads · torch "
        f"{result['versions'].get('torch')} · load average {result['load']['load_average_start'][0]} → "
        f"{result['load']['load_average_end'][0]}, other processes "
        f"{result['load'].get('other_processes_cores', 'n/a')} cores on average",
        "",
    ]
    if result["graph"]:
        lines += _graph_table(result["graph"]) + [""]
    lines += [
        f"## CPU forward + backward, fp32, {t['rows']:,} rows × {t['columns']:,} columns (ms, median of the quiet "
        f"rounds of {t['rounds']}; min–max)",
        "",
        "| loss | mode | before ms | after ms | after / before | before first call s | after first call s | "
        "quiet rounds (before, after) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    times = {(x["loss"], x["mode"], x["version"]): x for x in t["timings"]}
    for (label, mode, version), a in times.items():
        if version != "after":
            continue
        b = times.get((label, mode, "before"))
        cell = (lambda s: f"{s['median']:,.0f} ({s['min']:,.0f}–{s['max']:,.0f})")
        ratio = f"{a['median'] / b['median']:.2f}" if b else "—"
        lines.append(f"| {label} | {mode} | {cell(b) if b else '—'} | {cell(a)} | {ratio} | "
                     f"{b['first_call_seconds'] if b else '—'} | {a['first_call_seconds']} | "
                     f"{b['quiet'] if b else '—'}, {a['quiet']} of {a['n']} |")
    lines += ["", "Before vs after, same inputs (first calls):", ""]
    for what, agree in t["before_vs_after_values"].items():
        lines.append(f"- {what}: " + ("bit-identical" if agree["bit_identical"] else
                     f"loss rel. diff {agree['loss_rel_diff']:.1e}, gradient max abs diff "
                     f"{agree['grad_max_abs_diff']:.1e} (max |grad| {agree['grad_max_abs']:.1e})"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="621a58c", help="the revision whose loss.py is BEFORE (default 621a58c)")
    parser.add_argument("--rows", type=int, default=8192, help="B·T rows of the timed loss (default 8192)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of every contender (default 5)")
    parser.add_argument("--no-graphs", action="store_true", help="time only (no graph sizes under torch.compile)")
    parser.add_argument("--name", default="chunked-loss-cpu", help="results file stem (default chunked-loss-cpu)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    # First calls compile from scratch: no FX-graph or AOTAutograd cache from earlier runs or tests.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        before = load_before(args.base, Path(tmp))
        with LoadMeter() as load:
            graph = [] if args.no_graphs else run_graphs(before)
            times = run_times(before, args.rows, args.rounds)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/chunked_loss.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "base": args.base, "head": head + ("+dirty" if dirty else ""), "hardware": hardware_summary("cpu"),
              "versions": library_versions(), "load": load.record, "graph": graph, "time": times}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.name}.json", result)
    atomic_write_text(args.out / f"{args.name}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
