"""Validation loss: the token-weighted mean cross-entropy over held-out batches, summed over ranks.

Each batch contributes ``mean loss × its target tokens``, so the result is the mean over tokens (not over
batches) and does not depend on how batches are split across ranks. Given the tokens' byte lengths (``bpb.py``),
the UTF-8 bytes of the same targets are summed alongside, for bits per byte. The model is called exactly as in
training, ``model(x, targets=y)``, so a compiled model reuses its graph (only the grad mode differs).

Evaluations take minutes on big splits or slow machines, so they show progress (``progress.progress_bar``) on
stderr, so stdout keeps only results.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .. import dist
from ..device import autocast
from ..errors import UserError
from ..models import IGNORE_INDEX
from ..progress import progress_bar
from .bpb import bits_per_byte


@torch.no_grad()
def evaluate_loss(
    model,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device,
    autocast_dtype: torch.dtype | None = None,
    world_size: int | None = None,
    progress: bool = False,
    total: int | None = None,
    desc: str = "val loss",
    token_bytes: torch.Tensor | None = None,
) -> dict:
    """``{"loss", "tokens", "batches"}`` (and ``"bytes"``, ``"bpb"`` given ``token_bytes``, each token id's UTF-8
    byte count, ``bpb.token_byte_lengths``) over this rank's ``(x, y)`` batches, reduced over ``world_size`` ranks.

    ``world_size`` defaults to the launch's (``dist.world_size()``: 1 for one process); every rank must call this,
    even one with no batches. ``progress`` shows a bar over the batches on rank 0 (``total``: this rank's batch
    count, for the ETA; default ``len(batches)``, which ``val_batches`` has). The bar only counts batches:
    nothing is read back from the device per batch, so a compiled model runs as without it.
    """
    world_size = dist.world_size() if world_size is None else world_size
    progress = progress and dist.is_main()
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    device = torch.device(device)
    loss_sum = torch.zeros((), dtype=accumulator_dtype(device), device=device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)  # exact at any count
    n_bytes = torch.zeros((), dtype=torch.int64, device=device)
    if token_bytes is not None:
        token_bytes = token_bytes.to(device)
    n_batches = 0
    was_training = model.training
    model.eval()
    try:
        for x, y in progress_bar(batches, total=total, desc=desc, unit="batch", enabled=progress):
            # accumulated on the device: no host sync per batch
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, autocast_dtype):
                loss = model(x, targets=y)[1]
            count = (y != IGNORE_INDEX).sum()
            loss_sum += torch.where(count > 0, loss.to(loss_sum.dtype) * count, 0.0)  # an all-padding batch: NaN
            tokens += count
            if token_bytes is not None:
                n_bytes += torch.where(y != IGNORE_INDEX, token_bytes[y.clamp(min=0)], 0).sum()
            n_batches += 1
    finally:
        model.train(was_training)
    sums = (loss_sum, tokens, torch.tensor(n_batches, device=device), n_bytes)
    if world_size > 1:
        for value in sums:
            dist.all_reduce(value)
    loss_sum, tokens, n_batches, n_bytes = (value.item() for value in sums)
    if tokens == 0:
        raise UserError("no validation tokens were evaluated: the val split is empty or smaller than one batch")
    result = {"loss": loss_sum / tokens, "tokens": tokens, "batches": n_batches}
    if token_bytes is not None:
        result.update(bytes=n_bytes, bpb=bits_per_byte(loss_sum, n_bytes))
    return result


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for the loss sum, except on Apple MPS, which has no float64 (float32 there: ~7 digits, ample)."""
    return torch.float32 if device.type == "mps" else torch.float64
