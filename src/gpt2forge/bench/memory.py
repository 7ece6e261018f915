"""Memory: what the loss implementation costs in one GPT-2 124M training step (any device), and on GPUs the peak
memory and the largest micro-batch that fits, per GPT-2 size."""

from __future__ import annotations

import logging
from functools import partial

import torch

from ..models import Runtime, build_model, make_config
from ..models.common import LOSS_KINDS
from .measure import VOCAB, StepMemory, adamw, autocast, bare_step, failure, free_memory, state_bytes
from .options import BenchOptions

log = logging.getLogger("gpt2forge.bench")


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
    """The loss comparison; then, on GPUs, per GPT-2 size the peak memory at the bench's micro-batch and the
    largest micro-batch that fits (T=1024)."""
    result = {"loss": loss_memory(opts, device)}
    if device.type != "cuda":
        result["reason"] = ("largest micro-batch: GPU only (a GPU has a fixed memory budget that bounds the "
                            "micro-batch; on a CPU the batch is bounded by host RAM and time)")
        return result
    rows = []
    for preset in MEMORY_PRESETS:
        log.info("memory: %s", preset)
        try:
            rows.append(measure_preset(preset, opts.batch_size, device))
        except torch.cuda.OutOfMemoryError as error:  # not even the weights and AdamW state fit
            rows.append({"preset": preset, "reason": failure(error)})
        free_memory(device)
    return {**result, "seq_len": MEMORY_SEQ_LEN, "limit": MEMORY_MAX_BATCH, "rows": rows,
            "how": "eager (no compile: a search recompiles per shape), bf16 autocast, flash SDPA, vocab 50304, "
                   "fused AdamW; one full training step per try",
            "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)}


def loss_memory(opts: BenchOptions, device: torch.device) -> dict:
    """Peak memory one GPT-2 124M training step (T=1024, vocab 50304) adds with each loss implementation: the
    reference loss copies the [B, T, V] logits to fp32 and keeps fp32 log-probabilities for the backward; the
    chunked one keeps neither. Same weights and batch for both."""
    quick = opts.quick or device.type == "mps"
    preset, batch = ("tiny", 2) if quick else ("gpt2", 16 if device.type == "cuda" else 4)
    probe, rows = StepMemory(device), []
    x = torch.randint(0, VOCAB, (batch, MEMORY_SEQ_LEN if not quick else 256), device=device)
    for kind in LOSS_KINDS:
        log.info("memory: %s step with the %s loss", preset, kind)
        torch.manual_seed(0)
        model = build_model(make_config("gpt2", preset, vocab_multiple=128), Runtime(loss=kind)).to(device)
        step = partial(bare_step, model, model, adamw(model, True, device), x, x,
                       partial(autocast, device, device.type == "cuda"))
        step()  # optimizer state allocated, allocator warm
        peak = probe.measure(step)
        rows.append({"loss": kind, "step_peak_mib": None if peak is None else peak / 2**20})
        model = step = None  # freed before the next implementation is measured
        free_memory(device)
    base, chunked = (row["step_peak_mib"] for row in rows)
    return {"preset": preset, "batch_size": batch, "seq_len": x.size(1), "rows": rows,
            "saved_mib": None if base is None else base - chunked, "reason": probe.reason,
            "how": ("max_memory_allocated during one step minus what was allocated before it" if device.type == "cuda"
                    else "peak RSS increase during one step (after malloc_trim)") + ", second step of each"}


def measure_preset(preset: str, batch_size: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(make_config("gpt2", preset, vocab_multiple=128)).to(device)
    optimizer = adamw(model, True, device)
    peaks = {}  # micro-batch → peak GiB

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
    if batch_size <= largest and batch_size not in peaks:
        fits(batch_size)
    return {"preset": preset, "params_m": model.num_params() / 1e6, "state_gib": state_bytes(model, optimizer) / 2**30,
            "largest_batch": largest, "peak_gib_at_largest": peaks.get(largest), "batch_size": batch_size,
            "peak_gib_at_batch_size": peaks.get(batch_size), "reason": None if largest else "not even B=1 fits"}
