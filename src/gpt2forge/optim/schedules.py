"""Learning-rate and momentum schedules: pure functions of the step, so a resumed run needs no scheduler state.

``lr_at`` gives the peak-``lr`` curve; every parameter role follows the same shape scaled to its own peak
(``role_lr / lr``), so the base curve is computed once, exactly as GPT-2's reference recipe computes it.

A run stores the settings that shape its curve (``schedule_settings``) in every checkpoint; on resume,
``schedule_change`` compares them with the config and says whether, and from which step, the LR would change.
"""

from __future__ import annotations

import dataclasses
import math

from ..config import OptimSection
from ..errors import UserError

ROLES = ("matrix", "embedding", "head", "scalar", "lambda", "value_embed")
SCHEDULE_KEYS = ("schedule", "lr", "min_lr", "warmup_steps", "decay_steps", "cooldown_fraction",
                 *(f"{role}_lr" for role in ROLES))


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


def muon_momentum_at(step: int, optim: OptimSection, max_steps: int) -> float:
    """Muon's momentum: linear from ``muon_momentum_start`` to ``muon_momentum`` over its warmup steps, then back
    down to ``muon_momentum_start`` over the last ``muon_momentum_cooldown_steps`` steps (reached on the last)."""
    high, low = optim.muon_momentum, optim.muon_momentum_start
    if step < optim.muon_momentum_warmup_steps:
        return low + step / optim.muon_momentum_warmup_steps * (high - low)
    cooldown = optim.muon_momentum_cooldown_steps
    if cooldown and step >= max_steps - cooldown:
        return high - min(1.0, (step - (max_steps - cooldown) + 1) / cooldown) * (high - low)
    return high


def schedule_settings(optim: OptimSection, max_steps: int) -> dict:
    """The settings that decide the LR of every step: stored in the train state, compared on resume."""
    return {"max_steps": max_steps, **{key: getattr(optim, key) for key in SCHEDULE_KEYS}}


def lr_curve(optim: OptimSection, max_steps: int, step: int) -> tuple[float, ...]:
    """Every role's LR at ``step`` (as ``Optimizers.set_step`` computes them)."""
    base = lr_at(step, optim, max_steps)
    return tuple(base * (optim.role_lr(role) / optim.lr) for role in ROLES)


def schedule_change(stored: dict | None, optim: OptimSection, max_steps: int, step: int,
                    reschedule: bool) -> str | None:
    """Resuming at ``step`` a run whose schedule was ``stored``, with ``optim``/``max_steps`` now: a note to log
    (None when nothing changes), or a ``UserError`` when the LR of a coming step would change and ``reschedule``
    (``train.reschedule``) does not allow it. ``stored`` None: the run recorded no schedule."""
    if stored is None:
        return ("the checkpoint records no LR schedule (an older version wrote it): the config's schedule is used "
                "as it is")
    mine = schedule_settings(optim, max_steps)
    changed = {key: (stored.get(key), value) for key, value in mine.items() if stored.get(key) != value}
    if not changed:
        return None
    old_optim = dataclasses.replace(optim, **{k: stored[k] for k in SCHEDULE_KEYS if k in stored})
    old_max = int(stored.get("max_steps", max_steps))
    first = next((s for s in range(step, max_steps)
                  if lr_curve(old_optim, old_max, s) != lr_curve(optim, max_steps, s)), None)
    what = ", ".join(f"{'train' if key == 'max_steps' else 'optim'}.{key} {old} → {new}"
                     for key, (old, new) in changed.items())
    if first is None:
        return f"resuming with {what}: the LR of the coming steps is unchanged by it"
    follows = ""
    if optim.schedule == "cosine" and optim.decay_steps is None and "max_steps" in changed:
        follows = " (optim.decay_steps is unset, so the cosine decay ends at train.max_steps)"
    elif optim.schedule == "wsd" and "max_steps" in changed:
        follows = " (the wsd cooldown is the last optim.cooldown_fraction of train.max_steps)"
    old_lr, new_lr = lr_at(first, old_optim, old_max), lr_at(first, optim, max_steps)
    jump = (f"the LR of step {first + 1} would be {new_lr:.3g} instead of {old_lr:.3g}"
            + (f" (×{new_lr / old_lr:.2g})" if old_lr > 0 else ""))
    if reschedule:
        return f"train.reschedule=true: the LR schedule changes: {what}{follows}; {jump}"
    keep = "resume with the run's own settings"
    if follows and optim.schedule == "cosine":
        keep += (f" (to train past the end of its schedule at its final LR, set "
                 f"--optim.decay_steps={stored.get('decay_steps') or old_max} explicitly)")
    raise UserError(f"this run was started with another LR schedule: {what}{follows}. Resuming at step {step}, "
                    f"{jump}. To keep the run's schedule, {keep}; to adopt the new one, add --train.reschedule=true")
