"""The markdown report of a bench result (the JSON holds the same figures and every sample)."""

from __future__ import annotations

from .measure import QUIET_CORES
from .options import SECTIONS, TARGET_MFU, TARGETS

ABLATION_HEADER = (
    "| # | configuration | ms/step | min–max | quiet rounds used | tokens/s | TFLOP/s | MFU (llm.c) | peak MiB "
    "| compile s | speed-up | A100 ref. ms (speed-up) | note |"
)


def _num(value, fmt: str = ",.0f", missing: str = "n/a") -> str:
    return missing if value is None else format(value, fmt)


def _load_line(load: dict | None) -> str:
    if not load:
        return ""
    others = load.get("other_processes_cores")
    busy = f"; other processes kept {others:.2f} cores busy" if others is not None else ""
    start, end = load["load_average_start"][0], load["load_average_end"][0]
    return f"_Load during this section ({load['seconds']} s): 1-min load average {start:.2f} → {end:.2f}{busy}._"


QUICK_NOTE = ("**Smoke test (`--quick`), not a result**: a tiny batch and 1-2 timed steps per round check that every "
              "section runs; its figures are too small and too few to compare. Run `gpt2forge bench` without "
              "`--quick` for figures to record.")
CONTENDED = ("contended: other processes kept ≥ {cores} cores busy in every round, so no quiet round was left to "
             "measure; indicative only, re-run on a quiet machine")


def _contended_note() -> str:
    return CONTENDED.format(cores=QUIET_CORES)


def _ablation_row(r: dict) -> str:
    ref = f"{r['a100_ref_ms']:.0f} ({r['a100_ref_speedup']:.1f}×)"
    if r["reason"]:
        return f"| {r['row']} | {r['configuration']} |{' — |' * 9} {ref} | {r['reason']} |"
    note = "contended: no quiet round" if r["quiet_rounds"] == 0 else ""
    cells = [
        str(r["row"]), r["configuration"], f"{r['ms_per_step']:,.1f}", f"{r['ms_min']:,.0f}–{r['ms_max']:,.0f}",
        f"{r['quiet_rounds']}/{len(r['ms_samples'])}", f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.3f}",
        _mfu_cell(r), _num(r["peak_mib"]), _num(r["compile_s"], ".1f", "—"),
        f"{r['speedup']:.2f}×", ref, note,
    ]
    return "| " + " | ".join(cells) + " |"


def _mfu_cell(r: dict) -> str:
    """Ours, and llm.c's accounting beside it (rows recorded before it had one show ours alone)."""
    if r["mfu"] is None:
        return "n/a"
    return f"{100 * r['mfu']:.1f}%" + (f" ({100 * r['mfu_llmc']:.1f}%)" if r.get("mfu_llmc") is not None else "")


def ablation_markdown(a: dict) -> list[str]:
    lines = [
        f"## Ablation: `{a['preset']}`, B={a['batch_size']}, T={a['seq_len']} ({a['tokens_per_step']:,} tokens/step)",
        "",
        (f"Each row adds its optimization to all above. The rows are built first, then timed in alternation for "
         f"{a['rounds']} rounds of {a['steps_per_round']} steps, so foreign load hits them alike. ms/step is the "
         f"median over the *quiet* rounds — those in which other processes kept < {QUIET_CORES} cores busy during "
         "every row's block (from /proc/stat); all rounds when none was — and min–max is over all rounds."),
        "",
        ABLATION_HEADER,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *map(_ablation_row, a["rows"]),
        "",
        f"- speed-up: over row `{a['baseline_row']}` (the first measured row), by medians.",
    ]
    if any(r["quiet_rounds"] == 0 for r in a["rows"] if not r["reason"]):
        lines.append(f"- rows noted *contended*: {_contended_note()}.")
    if a["mfu_reason"]:
        lines.append(f"- MFU: n/a — {a['mfu_reason']}.")
    else:
        best = max((r["mfu"] for r in a["rows"] if r.get("mfu") is not None), default=0.0)
        lines.append(f"- MFU: achieved FLOP/s (6N + 12·L·H·Q·T per token; in brackets llm.c's 6N + 6·L·C·T with N "
                     f"every parameter) over the bf16 peak of "
                     f"{a['peak_flops'] / 1e12:.0f} TFLOP/s; best row {100 * best:.1f}% (target for gpt2 at T=1024 "
                     f"on an H100: ≥ {100 * TARGET_MFU:.0f}%).")
    lines += [
        f"- peak memory: {a['memory']}.",
        ("- compile s: the first step's time minus a timed step's, i.e. compiling forward and backward "
         "from cold (inductor's caches are off for it). A row whose model is an earlier row's (+ fused AdamW changes "
         "only the optimizer) reuses that compiled graph: ~0 s. The JSON keeps every row's first-step time."),
        f"- reference: {a['reference']}.",
    ]
    if a.get("profile"):
        lines += ["", "Top 10 by self time (`--profile`, last measured row):", "", "```", a["profile"].rstrip(), "```"]
    return lines


def overhead_markdown(o: dict, quick: bool = False) -> list[str]:
    """The overhead table and figure; the figure is in bold (a finding) only when measured in full mode on quiet
    rounds: a --quick figure is marked a smoke test, one from contended rounds indicative only."""
    c, t, b, per_round = o["config"], o["trainer_ms"], o["bare_ms"], o["overhead_pct_per_round"]
    rounds = f"{o['quiet_rounds']} quiet rounds" if o["quiet_rounds"] else f"all {o['rounds']} rounds (none was quiet)"
    verdict = "within" if o["overhead_pct"] < o["goal_pct"] else "over"
    figure = f"Overhead: {o['overhead_pct']:+.1f}%"
    if quick:
        figure = f"Overhead (smoke test, `--quick`: not a result): {o['overhead_pct']:+.1f}%"
    elif not o["quiet_rounds"]:
        figure = f"Overhead ({_contended_note()}): {o['overhead_pct']:+.1f}%"
    else:
        figure = f"**{figure}**"
    compile_ = "on" if c["compile"] else "off"
    return [
        (f"## Trainer overhead: `{c['preset']}`, B={c['batch_size']}, T={c['seq_len']}, {c['precision']}, "
         f"compile {compile_}"),
        "",
        "| loop | ms/step (median of quiet blocks) | min–max | quiet blocks |",
        "|---|---:|---:|---:|",
        f"| `Trainer.run` | {t['median']:,.1f} | {t['min']:,.1f}–{t['max']:,.1f} | {t['quiet']}/{t['n']} |",
        (f"| bare forward/backward/clip/AdamW | {b['median']:,.1f} | {b['min']:,.1f}–{b['max']:,.1f} | "
         f"{b['quiet']}/{b['n']} |"),
        "",
        (f"{figure} ({verdict} the goal of < {o['goal_pct']:.0f}%): the median over "
         f"{rounds} of (Trainer block / the bare block beside it − 1), range {min(per_round):+.1f}% to "
         f"{max(per_round):+.1f}%; ratio of the two medians {o['overhead_pct_of_medians']:+.1f}%. Blocks of "
         f"{o['steps_per_block']} steps, order alternating."),
        "",
        f"What is compared: {o['what']}.",
    ]


def data_markdown(d: dict) -> list[str]:
    lines = ["## Data", ""]
    p = d.get("prepare")
    if p is not None:
        lines += ["### prepare: tokenization throughput (`benchmarks/bench_prepare.py`)", ""]
        lines += [f"- {p[key]}" for key in ("reason", "measured_with", "markdown_error") if p.get(key)]
        if p.get("recorded_from"):
            lines.append(f"- recorded figures: `{p['recorded_from']}` (not re-measured); its ratios:")
        if p.get("markdown"):  # bench_prepare's own report, under this heading
            lines += [""] + [line for line in p["markdown"].splitlines() if not line.startswith("# ")]
        elif p.get("ratios"):
            lines += ["", "| ratio | value |", "|---|---:|", *(f"| {k} | {v:.2f} |" for k, v in p["ratios"].items())]
        lines.append("")
    ld = d.get("loader")
    if ld is not None:
        m = ld["ms_per_batch"]
        lines += [
            f"### loader: `TokenLoader.batch`, B={ld['batch_size']}, T={ld['seq_len']}, shuffled",
            "",
            (f"- {m['median']:.2f} ms per batch (median of {ld['rounds']} rounds × {ld['batches_per_round']} "
             f"batches; range {m['min']:.2f}–{m['max']:.2f}) over {ld['shards']} shards, "
             f"{ld['tokens_in_shards']:,} tokens, in the page cache"
             + (f" ({_contended_note()})" if m.get("quiet") == 0 else "")),
            f"- that is {ld['pct_of_gpu_step']:.1f}% of a {ld['gpu_step_ms']:.0f} ms {ld['gpu_step']}; {ld['note']}",
            "",
        ]
    return lines


def loss_memory_markdown(loss: dict) -> list[str]:
    if loss.get("reason"):
        return [f"Loss implementations: n/a — {loss['reason']}.", ""]
    rows = {r["loss"]: r["step_peak_mib"] for r in loss["rows"]}
    saved = loss["saved_mib"]
    return [
        f"One `{loss['preset']}` training step at B={loss['batch_size']}, T={loss['seq_len']} (vocab 50304): peak "
        f"memory it adds ({loss['how']}) with the reference loss {rows['reference']:,.0f} MiB, with the chunked loss "
        f"{rows['chunked']:,.0f} MiB: " + (f"**{saved:,.0f} MiB less** ({100 * saved / rows['reference']:.0f}%)"
                                           if saved > 0 else "no saving at this size (one chunk holds every row)")
        + ". Losses and gradients agree to fp32 rounding (tests/test_loss.py).", ""]


def memory_markdown(m: dict) -> list[str]:
    lines = ["## Memory", ""]
    if "loss" in m:
        lines += loss_memory_markdown(m["loss"])
    if m.get("reason"):
        return lines + [f"n/a — {m['reason']}.", ""]
    lines += [
        f"GPU memory {m['gpu_memory_gib']} GiB; T={m['seq_len']}; {m['how']}; search limit B ≤ {m['limit']}.",
        "",
        "| preset | params (M) | params + AdamW GiB | peak GiB at bench B | largest B | peak GiB at largest B | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in m["rows"]:
        if "params_m" not in r:
            lines.append(f"| {r['preset']} | — | — | — | — | — | {r['reason']} |")
            continue
        lines.append(f"| {r['preset']} | {r['params_m']:.0f} | {r['state_gib']:.1f} | "
                     f"{_num(r['peak_gib_at_batch_size'], '.1f')} (B={r['batch_size']}) | {r['largest_batch']} | "
                     f"{_num(r['peak_gib_at_largest'], '.1f')} | {r['reason'] or ''} |")
    return lines + [""]


def to_markdown(result: dict) -> str:
    hw, quick = result["hardware"], result["settings"]["quick"]
    lines = [
        f"# gpt2forge bench: {result['device_kind']}",
        "",
        f"- command: `{result['command']}`",
        f"- when: {result['time']}; total {result['seconds']:.0f} s{' (--quick mode)' if quick else ''}",
        (f"- hardware: {hw.get('gpu') or 'CPU only'}; host CPU {hw['cpu']} ({' '.join(hw['cpu_features'])}; torch "
         f"capability {hw['cpu_capability']}), {hw['cores_available']} cores available, {hw['torch_threads']} torch "
         "threads"),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
    ]
    if quick:
        lines += [f"> {QUICK_NOTE}", ""]
    renderers = {"ablation": ablation_markdown, "overhead": lambda o: overhead_markdown(o, quick),
                 "data": data_markdown, "memory": memory_markdown}
    for section in SECTIONS:
        if section in result:
            lines += [*renderers[section](result[section]), "", _load_line(result["load"].get(section)), ""]
    lines += ["## Targets", "", *(f"- {k}: {v}" for k, v in TARGETS.items()), ""]
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text
