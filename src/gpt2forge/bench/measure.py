"""How the bench measures: the machine and its load, timed blocks, a step's peak memory, the bare training step.

Machines are often shared (CI runners, colleagues' jobs), so every timed block also records how many cores
other processes kept busy meanwhile (/proc/stat minus our own CPU time); statistics prefer the quiet blocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import statistics
import time
from pathlib import Path

import torch

from ..config import OptimSection
from ..device import autocast as device_autocast
from ..device import gpu_model
from ..device import tf32_mode as device_tf32_mode
from ..optim import build_optimizers, make_adamw

VOCAB = 50257
QUIET_CORES = 0.25  # a timing counts as uncontended when other processes kept fewer cores busy (bench_prepare too)


# ---------------------------------------------------------------- the machine

def device_kind(device: torch.device) -> str:
    """Short name for result files: ``cpu``, ``h100``, ``a100``, … (falls back to the full GPU name)."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    key = gpu_model(name)
    return key.lower().replace(" ", "-") if key else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class LoadMeter:
    """How busy the machine was during a section: load average, and the cores other processes kept busy
    (all CPU time in /proc/stat minus our own), which is what disturbs a timing."""

    def __enter__(self):
        self.load_start = os.getloadavg()
        self.busy_start, self.ours_start, self.wall_start = busy_seconds(), _own_cpu_seconds(), time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.monotonic() - self.wall_start
        self.record = {"load_average_start": [round(x, 2) for x in self.load_start],
                       "load_average_end": [round(x, 2) for x in os.getloadavg()], "seconds": round(wall, 1)}
        busy = busy_seconds()
        if busy is not None and self.busy_start is not None and wall >= 1:  # /proc/stat counts in 10 ms ticks
            others = (busy - self.busy_start) - (_own_cpu_seconds() - self.ours_start)
            self.record["other_processes_cores"] = round(max(0.0, others) / wall, 2)


def busy_seconds() -> float | None:
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
    """Wait for the device's queued kernels, so that a timing covers them (CUDA and MPS run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, n: int, device: torch.device) -> tuple[float, float | None]:
    """Milliseconds per call of ``fn`` over ``n`` calls, and the cores other processes kept busy meanwhile (None
    where there is no /proc/stat, or the block is too short for its 10 ms ticks)."""
    synchronize(device)
    busy, own, start = busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    for _ in range(n):
        fn()
    synchronize(device)
    wall = time.perf_counter() - start
    others = None
    if busy is not None and wall >= 0.5:
        others = max(0.0, (busy_seconds() - busy - (_own_cpu_seconds() - own)) / wall)
    return 1000 * wall / n, others


def is_quiet(timing: tuple[float, float | None]) -> bool:
    return timing[1] is None or timing[1] < QUIET_CORES


def spread(timings: list[tuple[float, float | None]]) -> dict:
    """Median of the uncontended timings (of all when none was), with min and max of all and the counts."""
    ms = [t for t, _ in timings]
    quiet = [t for t, others in timings if is_quiet((t, others))]
    return {"median": statistics.median(quiet or ms), "min": min(ms), "max": max(ms), "quiet": len(quiet),
            "n": len(ms), "samples": [round(t, 2) for t in ms],
            "other_cores": [None if o is None else round(o, 2) for _, o in timings]}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


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
    return int(re.search(rf"^{field}:\s+(\d+)", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters plus optimizer state: what stays resident between steps (gradients are set to None)."""
    tensors = list(model.parameters())
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------- the training step

def adamw(model: torch.nn.Module, fused: bool, device: torch.device) -> torch.optim.AdamW:
    """The Trainer's AdamW (the recipe's defaults and parameter groups) with fusing asked for or not."""
    return build_optimizers(model, OptimSection(fused=fused), device.type, max_steps=1).optimizers["adamw"]


def fuses_adamw(device: torch.device) -> bool:
    """Whether the optimizer builder fuses AdamW on this device: asked on one parameter, so its rule is not copied."""
    one = [{"params": [torch.nn.Parameter(torch.zeros(1))]}]
    return bool(make_adamw(one, OptimSection(fused=True), device.type).defaults["fused"])


def autocast(device: torch.device, bf16: bool):
    return device_autocast(device, torch.bfloat16 if bf16 else None)


def bare_step(model, forward, optimizer, x, y, autocast_context, clip: float = 1.0) -> None:
    """Forward, backward, clip (the reference recipe's 1.0; 0 = none), optimizer: a training step, nothing around
    it."""
    with autocast_context():
        _, loss = forward(x, y)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def tf32_mode(device: torch.device, enabled: bool):
    """TF32 matmuls on or off for one block (global state, so set around each row's timing); CUDA only."""
    return device_tf32_mode(enabled) if device.type == "cuda" else contextlib.nullcontext()
