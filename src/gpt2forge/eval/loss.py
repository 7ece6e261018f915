"""Validation loss: the token-weighted mean cross-entropy over held-out batches, summed over ranks.

Each batch contributes ``mean loss × its target tokens``, so the result is the mean over tokens (not over
batches) and does not depend on how batches are split across ranks. The model is called exactly as in
training, ``model(x, targets=y)``, so a compiled model reuses its graph (only the grad mode differs).

Evaluations take minutes on big splits or slow machines, so they can show progress (``progress_bar``): on a
terminal a live tqdm bar with an ETA; in a log file (stderr not a TTY: a cluster job, ``nohup``, CI) a plain
line every 30 s and at the end, because tqdm's carriage-return redraws turn into one unreadable line there.
Progress goes to stderr, so stdout keeps only results.
"""

from __future__ import annotations

import sys
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
    progress: bool = False,
    total: int | None = None,
    desc: str = "val loss",
) -> dict:
    """``{"loss", "tokens", "batches"}`` over this rank's ``(x, y)`` batches, reduced over ``world_size`` ranks.

    ``world_size`` defaults to torch.distributed's (1 when it is not initialised); every rank must call this,
    even one with no batches. ``progress`` shows a bar over the batches on rank 0 (``total``: this rank's batch
    count, for the ETA; default ``len(batches)``, which ``val_batches`` has). The bar only counts batches:
    nothing is read back from the device per batch, so a compiled model runs as without it.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if distributed else 1
    progress = progress and (not distributed or dist.get_rank() == 0)
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    device = torch.device(device)
    loss_sum = torch.zeros((), dtype=accumulator_dtype(device), device=device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)  # exact at any count
    n_batches = 0
    was_training = model.training
    model.eval()
    try:
        for x, y in progress_bar(batches, total=total, desc=desc, unit="batch", enabled=progress):
            # accumulated on the device: no host sync per batch
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                _, loss = model(x, targets=y)
            count = (y != IGNORE_INDEX).sum()
            loss_sum += torch.where(count > 0, loss.to(loss_sum.dtype) * count, 0.0)  # an all-padding batch: NaN
            tokens += count
            n_batches += 1
    finally:
        model.train(was_training)
    sums = (loss_sum, tokens, torch.tensor(n_batches, device=device))
    if world_size > 1:
        for value in sums:
            dist.all_reduce(value)
    loss_sum, tokens, n_batches = (value.item() for value in sums)
    if tokens == 0:
        raise UserError("no validation tokens were evaluated: the val split is empty or smaller than one batch")
    return {"loss": loss_sum / tokens, "tokens": tokens, "batches": n_batches}


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for the loss sum, except on Apple MPS, which has no float64 (float32 there: ~7 digits, ample)."""
    return torch.float32 if device.type == "mps" else torch.float64


class _LogLines:
    """A file for tqdm that writes every redraw as a line of its own, skipping those that show no new progress
    (tqdm redraws the last state when it closes): progress readable in logs."""

    def __init__(self, stream) -> None:
        self.stream, self.last = stream, ""
        self.encoding = getattr(stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        progress = text.split(" [")[0]  # "desc: 40%|####      | 4/10", without the times and rate
        if text and progress != self.last:
            self.stream.write(text + "\n")
            self.last = progress

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable, *, total: int | None, desc: str, unit: str, enabled: bool = True):
    """``iterable`` with tqdm progress on stderr: a live bar (ETA included) on a terminal; elsewhere a line every
    30 s and a last one at the end. Disabled: ``iterable`` itself."""
    if not enabled:
        return iterable
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, mininterval=0.5, dynamic_ncols=True)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=_LogLines(sys.stderr), mininterval=30, ncols=100,
                ascii=True)
