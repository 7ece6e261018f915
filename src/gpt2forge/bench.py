"""``gpt2forge bench``: where the training time goes on this machine, measured side by side.

Sections, all written to ``benchmarks/results/bench-<device>.{json,md}`` with the hardware, library versions,
the exact command and the machine load:

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

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from .device import PEAK_BF16_TFLOPS, peak_flops
from .errors import UserError
from .model import GPT, PRESETS, preset_config
from .train.optim import param_groups

log = logging.getLogger("gpt2forge.bench")

SECTIONS = ("ablation", "overhead", "data", "memory")
VOCAB = 50257
# (preset, micro-batch, seq len, timed steps per round, rounds) per device kind. GPU: build-nanogpt's ablation
# batch (B=16, T=1024); CPU: the tiny preset at its full context, about a second per step on 2 cores.
DEFAULTS = {
    "cuda": ("gpt2", 16, 1024, 10, 5),
    "cpu": ("tiny", 8, 256, 3, 5),
    "quick": ("tiny", 2, 64, 1, 2),
}
QUICK_SKIP = "skipped in --quick mode: torch.compile costs 15-40 s per row on a CPU (the full run measures it)"

# Targets and reference points (REFERENCE.md).
TARGET_MFU = 0.50  # GPT-2 124M, T=1024, bf16, compile, flash on one H100
TARGET_TOKENS_PER_S = 580_000  # 50% of 989 TFLOP/s at 855 MFLOP/token
TARGET_OVERHEAD_PCT = 5.0
TARGETS = {
    "gpu": "GPT-2 124M, T=1024, bf16 + compile + flash + fused AdamW: MFU >= 50% on an H100 (~580k tokens/s); "
           "llm.c reaches ~40% (468k tokens/s/GPU on 8xH100), nanoGPT ~33%",
    "cpu": "the ablation of the tiny preset runs in CI-sized time; Trainer overhead over a bare loop < 5%",
    "overhead": "Trainer loop within 5% of a bare forward/backward/step loop",
}


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


@dataclass
class BenchOptions:
    preset: str
    device: str
    batch_size: int
    seq_len: int
    steps: int
    repeats: int
    sections: tuple[str, ...]
    quick: bool
    out: Path
    profile: bool

    def command(self) -> str:
        """The command line that reproduces this run, every option spelled out."""
        parts = ["gpt2forge", "bench", "--preset", self.preset, "--device", self.device,
                 "--batch-size", str(self.batch_size), "--seq-len", str(self.seq_len), "--steps", str(self.steps),
                 "--repeats", str(self.repeats), "--only", ",".join(self.sections), "--out", str(self.out)]
        parts += ["--quick"] * self.quick + ["--profile"] * self.profile
        return shlex.join(parts)


# ---------------------------------------------------------------- the machine

def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_kind(device: torch.device) -> str:
    """Short name for result files: ``cpu``, ``h100``, ``a100``, … (falls back to the full GPU name)."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    for key in PEAK_BF16_TFLOPS:  # ordered: specific names first
        if key in name:
            return key.lower().replace(" ", "-")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def describe_hardware(device: torch.device) -> dict:
    info = {"device": str(device), "cpu": cpu_model(), "cores_available": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return info


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("gpt2forge", "torch", "numpy", "accelerate", "tiktoken", "triton"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


class LoadMeter:
    """How busy the machine was during a section: load average, and the cores other processes kept busy
    (all CPU time in /proc/stat minus our own), which is what disturbs a timing."""

    def __enter__(self) -> LoadMeter:
        self.load_start = os.getloadavg()
        self.busy_start, self.ours_start, self.wall_start = _busy_seconds(), _own_cpu_seconds(), time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self.wall_start
        self.record = {"load_average_start": [round(x, 2) for x in self.load_start],
                       "load_average_end": [round(x, 2) for x in os.getloadavg()], "seconds": round(wall, 1)}
        busy = _busy_seconds()
        if busy is not None and self.busy_start is not None and wall >= 1:  # /proc/stat counts in 10 ms ticks
            others = (busy - self.busy_start) - (_own_cpu_seconds() - self.ours_start)
            self.record["other_processes_cores"] = round(max(0.0, others) / wall, 2)


def _busy_seconds() -> float | None:
    """CPU seconds all processes have been busy since boot (Linux), or None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ---------------------------------------------------------------- timing and memory

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, n: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / n


def spread(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def failure(error: BaseException) -> str:
    """An exception as a one-line table reason."""
    text = str(error).strip().splitlines()
    return f"failed: {type(error).__name__}: {text[0][:240] if text else ''}".rstrip(": ")


class StepMemory:
    """Peak memory a call adds on top of what is resident before it.

    CUDA: ``max_memory_allocated``. CPU: the peak RSS (VmHWM, reset through ``/proc/self/clear_refs``) after
    ``malloc_trim`` has handed freed heap pages back — otherwise a step would reuse pages a previous step
    freed and look free of charge.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reason = None
        self.trim = None
        if device.type == "cpu":
            try:
                self.trim = ctypes.CDLL("libc.so.6").malloc_trim
                Path("/proc/self/clear_refs").write_text("5")
            except (OSError, AttributeError):
                self.reason = "needs Linux (/proc/self/clear_refs) and glibc (malloc_trim) to measure a step's RSS"
        elif device.type != "cuda":
            self.reason = f"no memory probe for {device.type}"

    def measure(self, fn) -> int | None:
        """Bytes ``fn`` added at its peak, or None (see ``reason``)."""
        if self.reason:
            fn()
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base
        gc.collect()
        self.trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - base) * 1024


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M).group(1))


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters plus optimizer state: what stays resident between steps (gradients are set to None)."""
    tensors = list(model.parameters())
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------- the training step

def adamw(model: torch.nn.Module, fused: bool) -> torch.optim.AdamW:
    """The recipe's AdamW (train/optim.py's groups and betas) with the fused kernel on or off explicitly:
    ``build_optimizer`` only fuses on CUDA, and the ablation measures it wherever torch has it."""
    return torch.optim.AdamW(param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def bare_step(model, forward, optimizer, x, y, autocast_context) -> None:
    """Forward, backward, clip to 1.0, AdamW: the step of the reference loop, nothing around it."""
    with autocast_context():
        _, loss = forward(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def tf32_mode(device: torch.device, enabled: bool):
    """TF32 matmuls on or off for one block (global state, so set around each row's timing)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ---------------------------------------------------------------- ablation

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
            return "CUDA only: TF32 is a tensor-core matmul mode of NVIDIA GPUs; CPU fp32 matmuls stay fp32"
        if torch.cuda.get_device_capability(device)[0] < 8:
            return "needs an Ampere or newer GPU (compute capability >= 8.0)"
    if stage.key == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    if quick and settings["compile"]:
        return QUICK_SKIP
    return None


class Contender:
    """One ablation row: its own model, optimizer and compiled forward, built once, timed round after round."""

    def __init__(self, settings: dict, preset: str, device: torch.device, batch: tuple) -> None:
        torch.manual_seed(0)
        config = preset_config(preset, attention=settings["attention"], vocab_multiple=settings["vocab_multiple"])
        self.model = GPT(config).to(device)
        self.optimizer = adamw(self.model, settings["fused"])
        self.forward = torch.compile(self.model) if settings["compile"] else self.model
        self.settings, self.device, self.batch = settings, device, batch
        self.flops_per_token = self.model.flops_per_token(batch[0].size(1))

    def step(self) -> None:
        with tf32_mode(self.device, self.settings["tf32"]):
            bare_step(self.model, self.forward, self.optimizer, *self.batch,
                      lambda: autocast(self.device, self.settings["bf16"]))


def run_ablation(opts: BenchOptions, device: torch.device) -> dict:
    """Build every runnable row, warm each up (compile time recorded), then time them in alternation."""
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
            first = seconds_per_call(contender.step, 1, device)
            seconds_per_call(contender.step, 1, device)  # a second warm-up: allocator, autotuning
            row["first_step_s"] = round(first, 2)
            row["state_mib"] = state_bytes(contender.model, contender.optimizer) / 2**20
            step_peak = memory.measure(contender.step)
            row["step_peak_mib"] = None if step_peak is None else step_peak / 2**20
            row["flops_per_token"] = contender.flops_per_token
            live.append((row, contender))
        except Exception as error:  # OOM, compile errors: the row records why
            row["reason"] = failure(error)
            log.warning("ablation %s: %s", stage.key, row["reason"])
        contender = None  # no reference left in this frame when a failed row is freed
        free_memory(device)
    samples = {row["key"]: [] for row, _ in live}
    for r in range(opts.repeats + 1):  # round 0 only settles: re-faults pages a later row's malloc_trim took back
        for row, contender in list(live):
            try:
                ms = 1000 * seconds_per_call(contender.step, opts.steps if r else 1, device)
            except Exception as error:
                row["reason"] = failure(error)
                live.remove((row, contender))
                free_memory(device)
                continue
            if r:
                samples[row["key"]].append(ms)
        if r:
            log.info("ablation round %d/%d: %s", r, opts.repeats,
                     ", ".join(f"{row['key']} {samples[row['key']][-1]:.0f} ms" for row, _ in live))
    profile = profile_table(live[-1][1].step, device) if opts.profile and live else None
    return summarise_ablation(opts, device, rows, samples, memory.reason, profile)


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
        row.update(ms_per_step=ms, ms_min=timing["min"], ms_max=timing["max"], ms_samples=timing["samples"],
                   tokens_per_s=tokens / (ms / 1000))
        row["tflops"] = row["flops_per_token"] * row["tokens_per_s"] / 1e12
        row["mfu"] = row["tflops"] * 1e12 / peak if peak else None
        row["peak_mib"] = None if row["step_peak_mib"] is None else row["state_mib"] + row["step_peak_mib"]
        row["speedup"] = base["ms_per_step"] / ms  # the base row comes first, so it is summarised already
    if device.type == "cuda":
        mfu_reason = None if peak else f"peak FLOP/s of {torch.cuda.get_device_name(device)} unknown (device.py)"
        memory_how = "max_memory_allocated during one step minus what was allocated before it, plus the row's " \
                     "parameters and AdamW state"
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


# ---------------------------------------------------------------- trainer overhead

@contextlib.contextmanager
def quiet_train_log():
    """The Trainer logs every step at INFO to train.log, as in a real run; keep its lines off the console."""
    train_log = logging.getLogger("gpt2forge.train")
    before = train_log.level, train_log.propagate
    train_log.setLevel(logging.INFO)
    train_log.propagate = False
    try:
        yield
    finally:
        train_log.setLevel(before[0])
        train_log.propagate = before[1]


def overhead_config(opts: BenchOptions, device: torch.device, data_dir: Path, out_dir: Path):
    from .config import load_config

    cuda = device.type == "cuda"
    settings = {
        "model.preset": opts.preset, "data.dir": data_dir, "log.out_dir": out_dir, "log.run_name": "overhead",
        "train.micro_batch_size": opts.batch_size, "train.seq_len": opts.seq_len,
        "train.total_batch_tokens": opts.batch_size * opts.seq_len, "train.max_steps": 1,
        "train.device": device.type, "train.precision": "auto" if cuda else "fp32",
        "train.compile": cuda and not opts.quick,  # CPU: as the quickstart recipe (compiling costs more than it saves)
        "optim.warmup_steps": 10, "optim.decay_steps": 10_000,  # a schedule that does not move with max_steps
        "eval.val_every": 0, "eval.hellaswag_every": 0, "eval.sample_every": 0, "checkpoint.every": 0, "log.every": 1,
    }
    return load_config(None, [f"--{k}={v}" for k, v in settings.items()])


def run_overhead(opts: BenchOptions, device: torch.device, data_dir: Path, work_dir: Path) -> dict:
    """Trainer.run vs a bare loop on the same model, optimizer and batches, in alternating blocks (ABBA)."""
    from .train.trainer import Trainer

    config = overhead_config(opts, device, data_dir, work_dir)
    rounds, k = 2 * opts.repeats, opts.steps
    with quiet_train_log():
        trainer = Trainer(config)
        # The final checkpoint run() writes when it reaches max_steps is not a per-step cost: this benchmark calls
        # run() once per block, so it is switched off on this instance (checkpoint cadence is off anyway).
        trainer.save_checkpoint = lambda: None
        try:
            def trainer_block() -> None:
                trainer.config.train.max_steps = trainer.step + k
                trainer.run()

            def bare_block(batches) -> None:
                for x, y in batches:
                    bare_step(trainer.wrapped, trainer.train_model, trainer.optimizer, x, y, trainer.autocast)

            def replay() -> list:  # the batches of the trainer's last block, on the device before timing starts
                steps = range(trainer.step - k, trainer.step)
                return [tuple(t.to(device) for t in trainer.loader.batch(s)) for s in steps]

            log.info("overhead: warming up the Trainer%s", " (compiling)" if config.train.compile else "")
            warmup_s = seconds_per_call(trainer_block, 1, device)
            bare_block(replay())
            times = {"trainer": [], "bare": []}
            for r in range(rounds):
                batches = replay()
                blocks = [("trainer", trainer_block), ("bare", lambda: bare_block(batches))]
                for name, block in blocks if r % 2 == 0 else blocks[::-1]:
                    times[name].append(1000 * seconds_per_call(block, 1, device) / k)
                log.info("overhead round %d/%d: Trainer %.1f ms/step, bare %.1f ms/step", r + 1, rounds,
                         times["trainer"][-1], times["bare"][-1])
        finally:
            trainer.close()
    trainer_ms, bare_ms = spread(times["trainer"]), spread(times["bare"])
    per_round = [100 * (t / b - 1) for t, b in zip(times["trainer"], times["bare"])]
    return {
        "config": {"preset": opts.preset, "batch_size": opts.batch_size, "seq_len": opts.seq_len,
                   "precision": "bf16 autocast" if trainer.autocast_dtype else "fp32",
                   "compile": config.train.compile, "grad_accum": trainer.grad_accum, "log_every": 1},
        "rounds": rounds, "steps_per_block": k, "warmup_s": round(warmup_s, 2),
        "trainer_ms": trainer_ms, "bare_ms": bare_ms,
        "overhead_pct": 100 * (trainer_ms["median"] / bare_ms["median"] - 1),
        "overhead_pct_per_round": spread(per_round),
        "goal_pct": TARGET_OVERHEAD_PCT,
        "what": "Trainer.run (loader over shards, LR schedule, clip via accelerate, loss/norm .item(), finite check, "
                "metrics.csv + train.log line every step) vs forward/backward/clip/AdamW on batches already on the "
                "device; same model, optimizer and tokens; blocks alternate trainer-bare, bare-trainer",
    }


# ---------------------------------------------------------------- data

def write_random_shards(directory: Path, n_shards: int, tokens_per_shard: int) -> Path:
    from .data.shards import write_shard

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_shards):
        write_shard(directory / f"bench_train_{i:06d}.bin", rng.integers(0, VOCAB, tokens_per_shard, dtype=np.uint16))
    return directory


def run_loader(opts: BenchOptions, data_dir: Path, batch_size: int = 64, seq_len: int = 1024) -> dict:
    """TokenLoader.batch at the reference run's micro-batch, shuffled, over shards already in the page cache."""
    from .data.loader import TokenLoader

    loader = TokenLoader(data_dir, batch_size, seq_len, seed=0, shuffle=True)
    loader.batch(0)
    n = 2 if opts.quick else 10

    def fetch(first: int) -> None:
        for i in range(n):
            loader.batch(first + i)

    samples = [1000 * seconds_per_call(lambda: fetch(1 + r * n), 1, torch.device("cpu")) / n for r in range(opts.repeats)]
    timing = spread(samples)
    gpu_step_ms = 1000 * batch_size * seq_len / TARGET_TOKENS_PER_S
    return {
        "batch_size": batch_size, "seq_len": seq_len, "tokens_in_shards": loader.sequences.total * seq_len,
        "shards": len(loader.sequences.paths), "batches_per_round": n, "rounds": opts.repeats, "ms_per_batch": timing,
        "gpu_step_ms": round(gpu_step_ms, 1),
        "gpu_step": f"GPT-2 124M micro-step of {batch_size}x{seq_len} tokens at the H100 target "
                    f"({TARGET_TOKENS_PER_S:,} tokens/s)",
        "pct_of_gpu_step": 100 * timing["median"] / gpu_step_ms,
        "note": "the Trainer fetches batches synchronously, so this time adds to every micro-step",
    }


def find_prepare_script() -> Path | None:
    """benchmarks/bench_prepare.py of the source checkout (it is not part of the installed package)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        script = root / "benchmarks" / "bench_prepare.py"
        if script.is_file():
            return script
    return None


def run_prepare(opts: BenchOptions) -> dict:
    """bench_prepare's figures: measured now, or in --quick mode the recorded ones (if any) with the reason."""
    import importlib.util

    script = find_prepare_script()
    if script is None:
        return {"reason": "benchmarks/bench_prepare.py not found: run from a source checkout"}
    recorded = script.parent / "results" / "prepare-cpu.json"
    if opts.quick:
        out = {"reason": "skipped in --quick mode (tokenizes the corpus several times, about a minute)"}
        if recorded.is_file():
            out.update(recorded_from=str(recorded), **_prepare_figures(json.loads(recorded.read_text())))
        return out
    spec = importlib.util.spec_from_file_location("bench_prepare", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    repeats = min(opts.repeats, 3)
    log.info("data: prepare benchmark (%s, %d repeats)", script, repeats)
    try:
        return {"measured_with": f"{script.name}: run_prepare_benchmark(repeats={repeats})",
                **_prepare_figures(module.run_prepare_benchmark(repeats=repeats))}
    except Exception as error:
        return {"reason": failure(error)}


def _prepare_figures(result: dict) -> dict:
    keys = ("tokens_per_s", "tokens_per_s_median", "ratios", "workers", "repeats")
    return {k: result[k] for k in keys if k in result} | {"tokens": result.get("text", {}).get("tokens")}


# ---------------------------------------------------------------- memory (GPU)

MEMORY_PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
MEMORY_SEQ_LEN = 1024
MEMORY_MAX_BATCH = 512


def largest_fitting(fits, limit: int) -> int:
    """Largest n in 1..limit with ``fits(n)`` (0 if none), for a monotone ``fits``: doubling, then bisection."""
    lo, hi, n = 0, limit + 1, 1  # lo fits (or is 0); hi does not (or is past the limit)
    while n < hi:
        if not fits(n):
            hi = n
            break
        lo, n = n, 2 * n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def run_memory(opts: BenchOptions, device: torch.device) -> dict:
    """Per GPT-2 size: peak memory at the bench's micro-batch and the largest micro-batch that fits (T=1024)."""
    if device.type != "cuda":
        return {"reason": "GPU only: a GPU has a fixed memory budget that bounds the micro-batch; on a CPU the "
                          "batch is bounded by host RAM and time, and RSS is measured per ablation row instead"}
    how = "eager (no compile: a search recompiles per shape), bf16 autocast, flash SDPA, vocab 50304, fused AdamW"
    rows = []
    for preset in MEMORY_PRESETS:
        log.info("memory: %s", preset)
        torch.manual_seed(0)
        try:
            model = GPT(preset_config(preset, vocab_multiple=128)).to(device)
            optimizer = adamw(model, fused=True)
        except torch.cuda.OutOfMemoryError as error:
            rows.append({"preset": preset, "reason": failure(error)})
            free_memory(device)
            continue
        peaks = {}

        def fits(b: int) -> bool:
            x = torch.randint(0, VOCAB, (b, MEMORY_SEQ_LEN), device=device)
            torch.cuda.reset_peak_memory_stats(device)
            try:
                bare_step(model, model, optimizer, x, x, lambda: autocast(device, True))
                torch.cuda.synchronize(device)
            except torch.cuda.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                return False
            finally:
                free_memory(device)
            peaks[b] = torch.cuda.max_memory_allocated(device) / 2**30
            return True

        largest = largest_fitting(fits, MEMORY_MAX_BATCH)
        if opts.batch_size <= largest and opts.batch_size not in peaks:
            fits(opts.batch_size)
        rows.append({"preset": preset, "params_m": model.num_params() / 1e6,
                     "state_gib": state_bytes(model, optimizer) / 2**30, "largest_batch": largest,
                     "peak_gib_at_largest": peaks.get(largest), "batch_size": opts.batch_size,
                     "peak_gib_at_batch_size": peaks.get(opts.batch_size),
                     "reason": None if largest else "not even B=1 fits"})
        del model, optimizer
        free_memory(device)
    return {"seq_len": MEMORY_SEQ_LEN, "how": how, "limit": MEMORY_MAX_BATCH, "rows": rows,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)}


# ---------------------------------------------------------------- the report

def _num(value, fmt: str = ",.0f", missing: str = "n/a") -> str:
    return missing if value is None else format(value, fmt)


def _load_line(load: dict | None) -> str:
    if not load:
        return ""
    others = load.get("other_processes_cores")
    busy = f"; other processes kept {others:.2f} cores busy" if others is not None else ""
    return (f"_Load during this section ({load['seconds']} s): 1-min load average {load['load_average_start'][0]:.2f} "
            f"→ {load['load_average_end'][0]:.2f}{busy}._")


def ablation_markdown(a: dict) -> list[str]:
    lines = [
        f"## Ablation: `{a['preset']}`, B={a['batch_size']}, T={a['seq_len']} ({a['tokens_per_step']:,} tokens/step)",
        "",
        f"Median ms/step of {a['rounds']} rounds × {a['steps_per_round']} steps; the rows are built first and "
        "then timed in alternation, so foreign load hits them alike. Each row adds its optimization to all above.",
        "",
        "| # | configuration | ms/step | min–max | tokens/s | TFLOP/s | MFU | peak MiB | first step s | speed-up | "
        "A100 ref. ms (speed-up) | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in a["rows"]:
        ref = f"{r['a100_ref_ms']:.0f} ({r['a100_ref_speedup']:.1f}×)"
        if r["reason"]:
            lines.append(f"| {r['row']} | {r['configuration']} | — | — | — | — | — | — | — | — | {ref} | {r['reason']} |")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        note = "compile included" if r["settings"]["compile"] else ""
        lines.append(
            f"| {r['row']} | {r['configuration']} | {r['ms_per_step']:,.1f} | {r['ms_min']:,.0f}–{r['ms_max']:,.0f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tflops']:.3f} | {mfu} | {_num(r['peak_mib'])} | "
            f"{r['first_step_s']:.1f} | {r['speedup']:.2f}× | {ref} | {note} |"
        )
    lines += ["", f"- speed-up: over row `{a['baseline_row']}` (the first measured row), by medians."]
    if a["mfu_reason"]:
        lines.append(f"- MFU: n/a — {a['mfu_reason']}.")
    else:
        lines.append(f"- MFU: achieved FLOP/s (6N + 12·L·H·Q·T per token) over the bf16 peak {a['peak_flops'] / 1e12:.0f} TFLOP/s.")
    lines += [f"- peak memory: {a['memory']}.",
              "- first step: the first call of the row, including torch.compile's compilation where on (inductor's "
              "on-disk cache can shorten repeats).",
              f"- reference: {a['reference']}."]
    if a.get("profile"):
        lines += ["", "Top 10 by self time (`--profile`, last measured row):", "", "```", a["profile"].rstrip(), "```"]
    return lines


def overhead_markdown(o: dict) -> list[str]:
    c, t, b, pr = o["config"], o["trainer_ms"], o["bare_ms"], o["overhead_pct_per_round"]
    verdict = "within" if o["overhead_pct"] < o["goal_pct"] else "over"
    return [
        f"## Trainer overhead: `{c['preset']}`, B={c['batch_size']}, T={c['seq_len']}, {c['precision']}, "
        f"compile {'on' if c['compile'] else 'off'}",
        "",
        "| loop | ms/step (median) | min–max |",
        "|---|---:|---:|",
        f"| `Trainer.run` | {t['median']:,.1f} | {t['min']:,.1f}–{t['max']:,.1f} |",
        f"| bare forward/backward/clip/AdamW | {b['median']:,.1f} | {b['min']:,.1f}–{b['max']:,.1f} |",
        "",
        f"**Overhead: {o['overhead_pct']:+.1f}%** ({verdict} the goal of < {o['goal_pct']:.0f}%); per round: median "
        f"{pr['median']:+.1f}%, range {pr['min']:+.1f}% to {pr['max']:+.1f}% over {o['rounds']} rounds of "
        f"{o['steps_per_block']} steps per loop.",
        "",
        f"What is compared: {o['what']}.",
    ]


def data_markdown(d: dict) -> list[str]:
    lines = ["## Data", ""]
    p = d.get("prepare")
    if p is not None:
        lines += ["### prepare (tokenization, `benchmarks/bench_prepare.py`)", ""]
        if p.get("reason"):
            lines.append(f"- {p['reason']}")
        if p.get("recorded_from"):
            lines.append(f"- recorded figures from `{p['recorded_from']}` (not re-measured):")
        if p.get("tokens_per_s"):
            lines += ["", "| pipeline | tokens/s (best) | tokens/s (median) |", "|---|---:|---:|"]
            medians = p.get("tokens_per_s_median", {})
            lines += [f"| {k} | {v:,} | {_num(medians.get(k))} |" for k, v in p["tokens_per_s"].items()]
            lines += ["", "| ratio | value |", "|---|---:|"]
            lines += [f"| {k} | {v:.2f} |" for k, v in p.get("ratios", {}).items()]
        lines.append("")
    ld = d.get("loader")
    if ld is not None:
        m = ld["ms_per_batch"]
        lines += [
            f"### loader: `TokenLoader.batch`, B={ld['batch_size']}, T={ld['seq_len']}, shuffled",
            "",
            f"- {m['median']:.2f} ms per batch (median of {ld['rounds']} rounds × {ld['batches_per_round']} batches; "
            f"range {m['min']:.2f}–{m['max']:.2f}) over {ld['shards']} shards, {ld['tokens_in_shards']:,} tokens, "
            "in the page cache",
            f"- that is {ld['pct_of_gpu_step']:.1f}% of a {ld['gpu_step_ms']:.0f} ms {ld['gpu_step']}; {ld['note']}",
            "",
        ]
    return lines


def memory_markdown(m: dict) -> list[str]:
    lines = ["## Memory", ""]
    if m.get("reason"):
        return lines + [f"n/a — {m['reason']}.", ""]
    lines += [f"GPU memory {m['gpu_memory_gib']} GiB; T={m['seq_len']}; {m['how']}; search limit B ≤ {m['limit']}.", "",
              "| preset | params (M) | params + AdamW GiB | peak GiB at bench B | largest B | peak GiB at largest B | note |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for r in m["rows"]:
        if "params_m" not in r:
            lines.append(f"| {r['preset']} | — | — | — | — | — | {r['reason']} |")
            continue
        lines.append(f"| {r['preset']} | {r['params_m']:.0f} | {r['state_gib']:.1f} | "
                     f"{_num(r['peak_gib_at_batch_size'], '.1f')} (B={r['batch_size']}) | {r['largest_batch']} | "
                     f"{_num(r['peak_gib_at_largest'], '.1f')} | {r['reason'] or ''} |")
    return lines + [""]


def to_markdown(result: dict) -> str:
    hw, s = result["hardware"], result["settings"]
    device = hw.get("gpu") or f"CPU: {hw['cpu']}"
    lines = [
        f"# gpt2forge bench: {result['device_kind']}",
        "",
        f"- command: `{result['command']}`",
        f"- when: {result['time']}; total {result['seconds']:.0f} s{' (--quick mode)' if s['quick'] else ''}",
        f"- hardware: {device}; host CPU {hw['cpu']}, {hw['cores_available']} cores available, "
        f"{hw['torch_threads']} torch threads",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
    ]
    renderers = {"ablation": ablation_markdown, "overhead": overhead_markdown, "data": data_markdown,
                 "memory": memory_markdown}
    for section in SECTIONS:
        if section in result:
            lines += renderers[section](result[section])
            lines += ["", _load_line(result["load"].get(section)), ""]
    lines += ["## Targets", "", *(f"- {k}: {v}" for k, v in TARGETS.items()), ""]
    return "\n".join(lines).replace("\n\n\n", "\n\n")


# ---------------------------------------------------------------- the command

def run_bench(opts: BenchOptions) -> dict:
    """Run the chosen sections (data first: it forks worker processes before torch starts its threads), write
    ``bench-<device>.{json,md}`` and return the results."""
    device = torch.device(opts.device)
    started = time.monotonic()
    result = {
        "benchmark": "gpt2forge bench", "command": opts.command(), "device_kind": device_kind(device),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "hardware": describe_hardware(device),
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
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(result))
    result["files"] = [str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))]
    log.info("wrote %s.{json,md}", stem)


def resolve_options(args: argparse.Namespace) -> BenchOptions:
    """Per-device defaults for what was not given, and checks that fail before any work starts."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (this torch build: "
                        f"{torch.__version__}); use --device cpu")
    preset, batch, seq_len, steps, repeats = DEFAULTS["quick" if args.quick else device]
    sections = tuple(s.strip() for s in (args.only or ",".join(SECTIONS)).split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise UserError(f"--only: unknown section(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SECTIONS)}")
    opts = BenchOptions(
        preset=args.preset or preset, device=device, batch_size=args.batch_size or batch,
        seq_len=args.seq_len or seq_len, steps=args.steps or steps, repeats=args.repeats or repeats,
        sections=tuple(s for s in SECTIONS if s in sections), quick=args.quick, out=Path(args.out),
        profile=args.profile,
    )
    if opts.preset not in PRESETS:
        raise UserError(f"--preset {opts.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    for name in ("batch_size", "seq_len", "steps", "repeats"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(opts, name)}")
    block = PRESETS[opts.preset].get("block_size", 1024)
    if opts.seq_len > block:
        raise UserError(f"--seq-len {opts.seq_len} exceeds the context length of {opts.preset} ({block})")
    return opts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="model preset (default: gpt2 on a GPU, tiny on a CPU)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if present")
    parser.add_argument("--batch-size", type=int, help="micro-batch of the ablation and overhead (GPU 16, CPU 8)")
    parser.add_argument("--seq-len", type=int, help="sequence length (GPU 1024, CPU 256)")
    parser.add_argument("--steps", type=int, help="timed steps per round (GPU 10, CPU 3)")
    parser.add_argument("--repeats", type=int, help="rounds; medians are reported (default 5)")
    parser.add_argument("--only", metavar="SECTIONS", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long smoke mode (tiny model, B=2, T=64, compile rows skipped); results go to "
                             "bench-<device>-quick.*")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's top 10 kernels (CUDA) / ops (CPU) of the fastest configuration")
    parser.add_argument("--out", default="benchmarks/results", help="directory of bench-<device>.{json,md}")


def run(args: argparse.Namespace) -> None:
    opts = resolve_options(args)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    log.info("bench: %s", opts.command())
    result = run_bench(opts)
    print(to_markdown(result))
