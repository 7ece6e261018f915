"""What actually runs on the device: the SDPA backend an architecture's attention gets, and a step's kernels.

Both are read off ``torch.profiler`` rather than assumed: the attention op the dispatcher picked is named in the
profile (``aten::_scaled_dot_product_flash_attention`` and kin), and every SDPA backend is also tried alone
(``torch.nn.attention.sdpa_kernel``), so a record says which could run and which did. Kernel categories (GEMM,
attention, loss, optimizer) are read from kernel names, a heuristic: the raw top-kernel table is kept beside them.
"""

from __future__ import annotations

import re

import torch

from .measure import failure, synchronize

# The profiler's op name of each SDPA backend (CPU's flash kernel has its own name).
SDPA_OPS = {
    "flash": ("aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_for_cpu"),
    "cudnn": ("aten::_scaled_dot_product_cudnn_attention",),
    "efficient": ("aten::_scaled_dot_product_efficient_attention",),
    "math": ("aten::_scaled_dot_product_attention_math",),
}
# Kernel-name patterns per category, first match wins (GEMM libraries: cuBLAS/cuBLASLt "gemm"/"nvjet"/"sm90_xmma",
# CUTLASS; Triton matmul templates "mm"; attention: FlashAttention, cuDNN's fused SDPA, xformers-style "fmha").
CATEGORIES = (
    ("attention", r"flash|fmha|attention|sdpa|_attn"),
    ("loss", r"cross_entropy|nll_loss|log_softmax|logsumexp|softmax_backward|_softcap|chunked"),
    ("optimizer", r"adam|muon|newton|multi_tensor|foreach|_amp_"),
    ("gemm", r"gemm|nvjet|xmma|cutlass|wgmma|cublas|\bmm\b|_mm_|addmm|bmm|matmul|triton_tem_fused_mm"),
)


def sdpa_backends(model: torch.nn.Module, idx: torch.Tensor, dtype: torch.dtype | None) -> dict:
    """Which SDPA backends can run this model's attention alone (forward + backward), and which the default
    dispatch runs: ``{"default": name, "runs_alone": {name: "ok" | reason}}``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from ..device import autocast

    def step() -> None:
        with autocast(idx.device, dtype):
            _, loss = model(idx, idx)
        loss.backward()
        model.zero_grad(set_to_none=True)
        synchronize(idx.device)

    alone = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
        try:
            with sdpa_kernel([backend]):
                step()
            alone[name] = "ok"
        except Exception as error:  # "no viable backend" and kin: this backend cannot take these shapes here
            alone[name] = failure(error)
    step()  # warm: the profiled step below is a steady one
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return {"default": backend_in_profile(prof), "runs_alone": alone}


def backend_in_profile(prof) -> str | None:
    """The SDPA backend whose op appears in a profile (None: no fused attention op ran, e.g. manual attention)."""
    names = {event.key for event in prof.key_averages()}
    found = [name for name, ops in SDPA_OPS.items() if names & set(ops)]
    return "+".join(found) or None


def category(kernel: str) -> str:
    name = kernel.lower()
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, name)), "other")


def profile_steps(step, device: torch.device, steps: int = 2):
    """``torch.profiler`` over ``steps`` calls of ``step`` (device kernels on CUDA, ops on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    return prof


def kernel_summary(prof, device: torch.device, steps: int, top: int = 15) -> dict:
    """The profile's device kernels (CPU: leaf ops) by self time: per step, the top ones and the share of each
    category, and the attention backend seen."""
    cuda = device.type == "cuda"
    rows = []
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us <= 0 or (cuda and event.device_type != torch.autograd.DeviceType.CUDA):
            continue
        if not cuda and not event.key.startswith("aten::"):
            continue
        rows.append({"name": event.key, "calls": event.count // steps, "ms": us / 1000 / steps})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    shares: dict[str, float] = {}
    for r in rows:
        r["category"] = category(r["name"])
        r["share"] = r["ms"] / total if total else 0.0
        shares[r["category"]] = shares.get(r["category"], 0.0) + r["share"]
    return {
        "what": ("CUDA kernels" if cuda else "CPU aten ops") + f", self time per step over {steps} profiled steps",
        "total_ms": total, "kernels_per_step": sum(r["calls"] for r in rows), "shares": shares,
        "attention_backend": backend_in_profile(prof), "top": [{**r, "name": r["name"][:120]} for r in rows[:top]],
        "loss_kernels": [{**r, "name": r["name"][:120]} for r in rows if r["category"] == "loss"][:top],
        "categories": "by kernel name (heuristic): " + "; ".join(f"{c}: /{p}/" for c, p in CATEGORIES),
    }


def kernels_markdown(summary: dict, title: str) -> list[str]:
    shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(summary["shares"].items(), key=lambda kv: -kv[1]))
    attention = f"; attention backend seen: {summary['attention_backend']}" if summary["attention_backend"] else ""
    lines = [f"{title}: {summary['what']}; {summary['total_ms']:.1f} ms, {summary['kernels_per_step']} calls per "
             f"step; {shares}{attention}", "",
             "| kernel | category | calls/step | ms/step | share |", "|---|---|---:|---:|---:|"]
    for r in summary["top"]:
        lines.append(_kernel_row(r))
    extra = [r for r in summary.get("loss_kernels", []) if r not in summary["top"]]
    if extra:
        lines += ["", "The loss's other kernels (by name):", "", *lines[2:4], *map(_kernel_row, extra)]
    return lines


def _kernel_row(r: dict) -> str:
    name = r["name"].replace("|", "\\|")
    return f"| `{name}` | {r['category']} | {r['calls']} | {r['ms']:.2f} | {100 * r['share']:.1f}% |"
