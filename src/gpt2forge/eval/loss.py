"""Validation loss: the token-weighted mean cross-entropy over held-out batches, summed over ranks.

Each batch contributes ``mean loss × its target tokens``, so the result is the mean over tokens (not over
batches) and does not depend on how batches are split across ranks. The model is called exactly as in
training, ``model(x, targets=y)``, so a compiled model reuses its graph (only the grad mode differs).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import UserError
from ..models import IGNORE_INDEX


@torch.no_grad()
def evaluate_loss(
    model,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device,
    autocast_dtype: torch.dtype | None = None,
    world_size: int | None = None,
) -> dict:
    """``{"loss", "tokens", "batches"}`` over this rank's ``(x, y)`` batches, reduced over ``world_size`` ranks.

    ``world_size`` defaults to torch.distributed's (1 when it is not initialised); every rank must call this,
    even one with no batches.
    """
    import torch.distributed as dist

    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    device = torch.device(device)
    loss_sum = torch.zeros((), dtype=accumulator_dtype(device), device=device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)  # exact at any count
    n_batches = 0
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:  # accumulated on the device: no host sync per batch
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                _, loss = model(x, targets=y)
            count = (y != IGNORE_INDEX).sum()
            loss_sum += torch.where(count > 0, loss.to(loss_sum.dtype) * count, 0.0)  # an all-padding batch: NaN
            tokens += count
            n_batches += 1
    finally:
        model.train(was_training)
    totals = (loss_sum, tokens, torch.tensor(n_batches, device=device))
    if world_size > 1:
        for total in totals:
            dist.all_reduce(total)
    loss_sum, tokens, n_batches = (total.item() for total in totals)
    if tokens == 0:
        raise UserError("no validation tokens were evaluated: the val split is empty or smaller than one batch")
    return {"loss": loss_sum / tokens, "tokens": tokens, "batches": n_batches}


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for the loss sum, except on Apple MPS, which has no float64 (float32 there: ~7 digits, ample)."""
    return torch.float32 if device.type == "mps" else torch.float64
