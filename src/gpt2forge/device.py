"""What hardware we run on: device choice, autocast precision, a description for run records, peak FLOP/s for MFU.

Shared by training, evaluation and the benchmark, so that "auto" means the same thing everywhere.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from importlib import metadata
from pathlib import Path

import torch

from .errors import UserError

# Dense bf16 peak (TFLOP/s) without sparsity, from the vendor sheets; matched against the CUDA device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # names without a form factor are usually SXM (e.g. "NVIDIA H100 80GB HBM3")
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}


def pick_device(name: str = "auto") -> str:
    """``auto`` means CUDA when present, else Apple MPS, else CPU."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str, flag: str = "--device") -> str:
    """``pick_device(name)``, or a ``UserError`` naming ``flag`` when this machine cannot give what was asked: an
    unknown name, CUDA (or its GPU N) where there is none, MPS off a Mac. Every command that takes a device asks
    here before it starts, so a wrong one is one line, not torch's error from deep inside a model."""
    try:
        kind = torch.device(name).type if name != "auto" else "auto"
    except RuntimeError:
        kind = None
    if kind not in ("auto", "cpu", "cuda", "mps"):
        raise UserError(f"{flag}={name}: not a device this program knows; use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver? CUDA_VISIBLE_DEVICES?)")
            raise UserError(f"{flag}={name}: CUDA is not available here ({why}); use {flag}=cpu (or auto)")
        index, count = torch.device(name).index, torch.cuda.device_count()
        if index is not None and index >= count:
            raise UserError(f"{flag}={name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag}={name}: MPS (an Apple GPU) is not available here; use {flag}=cpu (or auto)")
    return pick_device(name)


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for a ``precision`` setting (fp32, bf16, auto) on ``device``; None = no autocast.

    ``auto`` is bf16 only on GPUs that compute it natively (Ampere and newer): older GPUs emulate bf16,
    slower than fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return None


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype``, or a no-op context for None (fp32)."""
    device = torch.device(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# TF32 (fp32 matmuls and convolutions on tensor cores, Ampere+): through the fp32_precision settings where torch has
# them (2.9+), never also through the legacy allow_tf32 flags: torch refuses to read one kind after the other was
# set, and Inductor reads the new kind.
_NEW_TF32_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def tf32_state() -> tuple:
    """The current TF32 settings (matmul, convolution), as ``restore_tf32`` takes them."""
    if _NEW_TF32_API:
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def restore_tf32(state: tuple) -> None:
    if _NEW_TF32_API:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = state
    else:  # pragma: no cover (torch < 2.9)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = state


def set_tf32(enabled: bool) -> tuple:
    """Allow TF32 for fp32 matmuls and convolutions on CUDA, or forbid it; returns the settings it replaced."""
    before = tf32_state()
    restore_tf32(("tf32", "tf32") if _NEW_TF32_API and enabled else ("ieee", "ieee") if _NEW_TF32_API
                 else (enabled, enabled))
    return before


@contextlib.contextmanager
def tf32_mode(enabled: bool):
    """TF32 as asked for the block, then as it was."""
    before = set_tf32(enabled)
    try:
        yield
    finally:
        restore_tf32(before)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def gpu_model(name: str) -> str | None:
    """The ``PEAK_BF16_TFLOPS`` key a CUDA device name is (whole words: an "L40" is not an "L4", a "GH200" not
    an "H200"), or None. The table is ordered: specific names before generic ones."""
    for key in PEAK_BF16_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return key
    return None


def peak_flops(device: torch.device | str) -> float | None:
    """Peak dense bf16 FLOP/s of a CUDA device, or None when unknown (CPUs: MFU is not reported)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    key = gpu_model(torch.cuda.get_device_name(device))
    return PEAK_BF16_TFLOPS[key] * 1e12 if key else None


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what CPU fp32/bf16 matmuls can use
PACKAGES = ("gpt2forge", "torch", "numpy", "accelerate", "tiktoken", "safetensors", "datasets", "pyarrow", "triton")


def _cpuinfo_field(name: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    flags = set((_cpuinfo_field("flags") or "").split())
    return [f for f in CPU_FEATURES if f in flags]


def hardware_summary(device: torch.device | str | None = None) -> dict:
    """The machine, recorded with every run, evaluation and benchmark."""
    info = {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device is not None:
        info["device"] = str(device)
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if device is not None and torch.device(device).type == "cuda":
            props = torch.cuda.get_device_properties(device)
            info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        compute_capability=f"{props.major}.{props.minor}")
    return info


def library_versions() -> dict:
    """Python and the versions of the libraries that decide results and speed (those installed)."""
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions
