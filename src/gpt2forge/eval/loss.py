"""Validation loss: the token-weighted mean cross-entropy over held-out batches, summed over ranks.

Each batch contributes ``mean loss × its target tokens``, so the result is the mean over tokens (not over
batches) and does not depend on how batches are split across ranks. The model is called exactly as in
training, ``model(x, targets=y)``, so a compiled model reuses its graph (only the grad mode differs).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import UserError
from ..model import IGNORE_INDEX


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
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, tokens, batches
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                _, loss = model(x, targets=y)
            tokens = (y != IGNORE_INDEX).sum()
            totals += torch.stack([loss.double() * tokens, tokens.double(), totals.new_ones(())])
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(totals)
    loss_sum, tokens, n_batches = totals.tolist()
    if tokens == 0:
        raise UserError("no validation tokens were evaluated: the val split is empty or smaller than one batch")
    return {"loss": loss_sum / tokens, "tokens": int(tokens), "batches": int(n_batches)}
