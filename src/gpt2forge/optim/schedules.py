"""Learning-rate and momentum schedules: pure functions of the step, so a resumed run needs no scheduler state.

``lr_at`` gives the peak-``lr`` curve; every parameter role follows the same shape scaled to its own peak
(``role_lr / lr``), so the base curve is computed once, exactly as GPT-2's reference recipe computes it.
"""

from __future__ import annotations

import math

from ..config import OptimSection


def lr_at(step: int, optim: OptimSection, max_steps: int) -> float:
    """The learning rate of step ``step`` (0-based) for a peak of ``optim.lr``.

    Both schedules warm up linearly over ``warmup_steps`` (from lr/warmup_steps). ``cosine`` then decays to
    ``min_lr`` at ``decay_steps`` (default ``max_steps``) and stays there. ``wsd`` (warmup–stable–decay) holds
    ``lr`` and decays linearly to ``min_lr`` over the last ``cooldown_fraction`` of ``max_steps``.
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "wsd":
        cooldown_start = max_steps - optim.cooldown_fraction * max_steps
        if step < cooldown_start:
            return optim.lr
        progress = min(1.0, (step - cooldown_start) / max(1.0, max_steps - cooldown_start))
        return optim.lr + progress * (optim.min_lr - optim.lr)
    decay_steps = optim.decay_steps or max_steps
    if step >= decay_steps:
        return optim.min_lr
    progress = (step - optim.warmup_steps) / max(1, decay_steps - optim.warmup_steps)
    return optim.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)


def muon_momentum_at(step: int, optim: OptimSection) -> float:
    """Muon's momentum: linear from ``muon_momentum_start`` to ``muon_momentum`` over its warmup steps."""
    if step >= optim.muon_momentum_warmup_steps:
        return optim.muon_momentum
    fraction = step / optim.muon_momentum_warmup_steps
    return optim.muon_momentum_start + fraction * (optim.muon_momentum - optim.muon_momentum_start)
