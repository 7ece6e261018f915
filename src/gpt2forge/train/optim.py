"""AdamW with GPT-2's parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import inspect
import math

import torch

from ..config import OptimSection


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay the ≥2-D parameters (matmul weights, embeddings); leave biases and LayerNorm gains alone."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied lm_head/wte appears once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, optim: OptimSection, device_type: str) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step when asked and the device supports it (CUDA and CPU)."""
    fused = optim.fused and device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(
        param_groups(model, optim.weight_decay),
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        fused=fused or None,
    )


def lr_at(step: int, optim: OptimSection, max_steps: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, cosine decay to ``min_lr`` at ``decay_steps``, then flat.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    decay_steps = optim.decay_steps or max_steps
    if step >= decay_steps:
        return optim.min_lr
    progress = (step - optim.warmup_steps) / max(1, decay_steps - optim.warmup_steps)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)
