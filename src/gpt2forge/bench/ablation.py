"""The optimization ablation: one training step with build-nanogpt's optimizations switched on one after another.

fp32 eager with manual attention → + TF32 → + bf16 autocast → + torch.compile → + flash SDPA → + vocab padded
to 50304 → + fused AdamW, each row cumulative, next to the published single-A100 figures (REFERENCE.md at the
repository root). Rows this device cannot run are listed with the reason; a row that fails (OOM, compile error)
records the error instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..device import peak_flops
from ..models import Runtime, build_model, make_config
from ..train.metrics import llmc_flops_per_token, mfu
from .measure import (
    VOCAB,
    StepMemory,
    adamw,
    autocast,
    bare_step,
    failure,
    free_memory,
    fuses_adamw,
    spread,
    state_bytes,
    synchronize,
    tf32_mode,
    timed,
)
from .options import BenchOptions

log = logging.getLogger("gpt2forge.bench")
QUICK_SKIP = "skipped in --quick mode: torch.compile costs 15-40 s per row on a CPU (the full run measures it)"


@dataclass(frozen=True)
class Stage:
    key: str
    label: str
    change: dict
    a100_ms: float  # build-nanogpt's single-A100 step time (approx., B=16, T=1024)


STAGES = (
    Stage("fp32", "fp32, eager, manual attention, vocab 50257, AdamW (for-each)", {}, 1000),
    Stage("tf32", "+ TF32 matmuls", {"tf32": True}, 333),
    Stage("bf16", "+ bf16 autocast", {"bf16": True}, 300),
    Stage("compile", "+ torch.compile", {"compile": True}, 130),
    Stage("flash", "+ flash attention (SDPA)", {"attention": "sdpa"}, 96),
    Stage("vocab", "+ vocab padded to 50304", {"vocab_multiple": 128}, 93),
    Stage("fused", "+ fused AdamW", {"fused": True}, 90),
)
BASELINE = {"tf32": False, "bf16": False, "compile": False, "attention": "manual", "vocab_multiple": 1, "fused": False}


def cumulative_settings() -> list[dict]:
    settings, out = dict(BASELINE), []
    for stage in STAGES:
        settings = {**settings, **stage.change}
        out.append(settings)
    return out


def unavailable(stage: Stage, settings: dict, device: torch.device, quick: bool) -> str | None:
    """Why this device cannot run a row, or None."""
    if stage.key == "tf32":
        if device.type != "cuda":
            return "CUDA only: TF32 is a tensor-core matmul mode of NVIDIA GPUs; elsewhere fp32 matmuls stay fp32"
        if torch.cuda.get_device_capability(device)[0] < 8:
            return "needs an Ampere or newer GPU (compute capability >= 8.0)"
    if stage.key == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    if stage.key == "fused" and not fuses_adamw(device):
        return f"build_optimizers has no fused AdamW for {device.type}: this row would repeat the one above"
    if quick and settings["compile"]:
        return QUICK_SKIP
    return None


class Contender:
    """One ablation row: its own model, optimizer and compiled forward, built once, timed round after round."""

    def __init__(self, settings: dict, preset: str, device: torch.device, batch: tuple) -> None:
        torch.manual_seed(0)
        config = make_config("gpt2", preset, vocab_multiple=settings["vocab_multiple"])
        self.model = build_model(config, Runtime(attention=settings["attention"])).to(device)
        self.optimizer = adamw(self.model, settings["fused"], device)
        self.forward = torch.compile(self.model) if settings["compile"] else self.model
        self.settings, self.device, self.batch = settings, device, batch
        self.flops_per_token = self.model.flops_per_token(batch[0].size(1))
        self.llmc_flops_per_token = llmc_flops_per_token(self.model, batch[0].size(1))

    def step(self) -> None:
        with tf32_mode(self.device, self.settings["tf32"]):
            bare_step(self.model, self.forward, self.optimizer, *self.batch,
                      lambda: autocast(self.device, self.settings["bf16"]))


def run_ablation(opts: BenchOptions, device: torch.device) -> dict:
    """Build every runnable row, warm each up (compile time recorded), then time them in alternation."""
    from torch._inductor import config as inductor_config  # ~1 s to import: only when measuring

    generator = torch.Generator().manual_seed(0)
    shape = (opts.batch_size, opts.seq_len)
    batch = tuple(torch.randint(0, VOCAB, shape, generator=generator).to(device) for _ in range(2))
    memory = StepMemory(device)
    rows, live = [], []
    for i, (stage, settings) in enumerate(zip(STAGES, cumulative_settings()), 1):
        row = {"row": i, "key": stage.key, "configuration": stage.label, "settings": settings,
               "a100_ref_ms": stage.a100_ms, "reason": unavailable(stage, settings, device, opts.quick)}
        rows.append(row)
        if row["reason"]:
            log.info("ablation %d/%d %s: %s", i, len(STAGES), stage.key, row["reason"])
            continue
        log.info("ablation %d/%d %s: building and warming up%s", i, len(STAGES), stage.key,
                 " (compiling)" if settings["compile"] else "")
        try:
            contender = Contender(settings, opts.preset, device, batch)
            with inductor_config.patch(force_disable_caches=True):  # a cold compile, the same in every run
                first_ms, _ = timed(contender.step, 1, device)
            timed(contender.step, 1, device)  # a second warm-up: allocator, autotuning
            row["first_step_s"] = round(first_ms / 1000, 2)
            row["state_mib"] = state_bytes(contender.model, contender.optimizer) / 2**20
            step_peak = memory.measure(contender.step)
            row["step_peak_mib"] = None if step_peak is None else step_peak / 2**20
            row["flops_per_token"] = contender.flops_per_token
            row["llmc_flops_per_token"] = contender.llmc_flops_per_token
            live.append((row, contender))
        except Exception as error:
            row["reason"] = failure(error)
            log.warning("ablation %s: %s", stage.key, row["reason"])
        contender = None  # no reference left in this frame when a failed row is freed
        free_memory(device)
    samples = {row["key"]: [] for row, _ in live}
    for r in range(opts.repeats + 1):  # round 0 only settles: re-faults pages a later row's malloc_trim took back
        for row, contender in list(live):
            try:
                timing = timed(contender.step, opts.steps if r else 1, device)
            except Exception as error:
                row["reason"] = failure(error)
                live.remove((row, contender))
                free_memory(device)
                continue
            if r:
                samples[row["key"]].append(timing)
        if r:
            log.info("ablation round %d/%d: %s", r, opts.repeats,
                     ", ".join(f"{row['key']} {samples[row['key']][-1][0]:.0f} ms" for row, _ in live))
    samples = same_rounds({row["key"]: samples[row["key"]] for row, _ in live})
    profile = profile_table(live[-1][1].step, device) if opts.profile and live else None
    return summarise_ablation(opts, device, rows, samples, memory.reason, profile)


def same_rounds(samples: dict[str, list]) -> dict[str, list]:
    """Give every row's timing of a round the round's worst contention, so that all rows' medians come from the
    same rounds: a round counts as quiet only if it was quiet for every row."""
    rounds = zip(*samples.values())
    worst = [max((others or 0.0) for _, others in timings) for timings in rounds]
    return {key: [(ms, w) for (ms, _), w in zip(timings, worst)] for key, timings in samples.items()}


def summarise_ablation(opts, device, rows, samples, memory_reason, profile) -> dict:
    peak = peak_flops(device)
    tokens = opts.batch_size * opts.seq_len
    base = next((row for row in rows if not row["reason"]), None)
    for row in rows:
        row["a100_ref_speedup"] = round(STAGES[0].a100_ms / row["a100_ref_ms"], 2)
        if row["reason"]:
            continue
        timing = spread(samples[row["key"]])
        ms = timing["median"]
        row.update(ms_per_step=ms, ms_min=timing["min"], ms_max=timing["max"], quiet_rounds=timing["quiet"],
                   ms_samples=timing["samples"], other_cores=timing["other_cores"], tokens_per_s=tokens / (ms / 1000))
        row["tflops"] = row["flops_per_token"] * row["tokens_per_s"] / 1e12
        row["mfu"] = mfu(row["tokens_per_s"], row["flops_per_token"], peak)
        row["mfu_llmc"] = mfu(row["tokens_per_s"], row["llmc_flops_per_token"], peak)
        row["peak_mib"] = None if row["step_peak_mib"] is None else row["state_mib"] + row["step_peak_mib"]
        row["speedup"] = base["ms_per_step"] / ms  # the base row comes first, so it is summarised already
        row["compile_s"] = row["first_step_s"] - ms / 1000 if row["settings"]["compile"] else None
    if device.type == "cuda":
        mfu_reason = None if peak else f"peak FLOP/s of {torch.cuda.get_device_name(device)} unknown (device.py)"
        memory_how = ("max_memory_allocated during one step minus what was allocated before it, plus the row's "
                      "parameters and AdamW state")
    else:
        mfu_reason = "no peak FLOP/s is known for CPUs (device.peak_flops covers CUDA GPUs); TFLOP/s is shown"
        memory_how = "peak RSS increase during one step (after malloc_trim), plus the row's parameters and AdamW state"
    return {
        "preset": opts.preset, "batch_size": opts.batch_size, "seq_len": opts.seq_len, "tokens_per_step": tokens,
        "steps_per_round": opts.steps, "rounds": opts.repeats, "baseline_row": base["key"] if base else None,
        "peak_flops": peak, "mfu_reason": mfu_reason, "memory": memory_reason or memory_how,
        "rows": rows, "profile": profile,
        "reference": "build-nanogpt single A100, GPT-2 124M, B=16 (approx.), T=1024: "
                     "1000 -> 333 -> 300 -> 130 -> 96 -> 93 -> 90 ms (REFERENCE.md, approx.)",
    }


def profile_table(step, device: torch.device, steps: int = 3) -> str:
    """torch.profiler's top 10 kernels (CUDA) or ops (CPU) by self time over a few steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=10)
