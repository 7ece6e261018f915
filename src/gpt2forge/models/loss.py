"""The language-model loss: mean next-token cross-entropy in fp32 over the real vocabulary.

Two implementations of the same number (to fp32 rounding), chosen by ``Runtime.loss``:

- ``reference``: the model slices the real vocabulary off its padded logits, the loss copies them to fp32 and
  calls ``F.cross_entropy`` — build-nanogpt's numerics, kept bit for bit for the reproduction recipe. At B=64,
  T=1024 and 50,304 columns that is a 13 GB fp32 copy plus 13 GB of log-probabilities kept for the backward.
- ``chunked``: the padded logits as the head produced them (bf16 under autocast), a chunk of rows at a time in
  fp32, the padded columns masked inside the chunk rather than sliced off with a copy, the soft cap (if any)
  applied per chunk. The forward keeps only each row's log-sum-exp; the backward recomputes a chunk's softmax
  and writes the gradient straight into a tensor of the logits' dtype. Peak extra memory: one fp32 chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import IGNORE_INDEX

CHUNK_BYTES = 1 << 28  # one fp32 chunk: 256 MB (1,334 rows of 50,304 columns), whatever the batch


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap·tanh(logits/cap)`` in fp32 (bf16 steps are 1/16 near a cap of 15); ``cap=0`` = unchanged."""
    return cap * torch.tanh(logits.float() / cap) if cap else logits


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference loss on logits already cut to the real vocabulary (and capped)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                          cap: float = 0.0) -> torch.Tensor:
    """The chunked loss on the head's padded logits [..., V_padded]; NaN when every target is ignored."""
    return ChunkedCrossEntropy.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), vocab_size, cap)


def chunk_rows(logits: torch.Tensor) -> int:
    return max(1, CHUNK_BYTES // (4 * logits.size(1)))


def _chunk(logits: torch.Tensor, start: int, end: int, vocab_size: int,
           cap: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``start:end``: capped fp32 logits with the padded columns at -inf, and tanh(logits/cap), which the
    backward reuses for the cap's derivative (None without a cap). The same operations as ``softcap``: on a CPU
    these passes over [rows, V] are most of the cap's cost, so each is done once."""
    raw = logits[start:end].float()
    if cap:
        t = (raw / cap).tanh_()
        x = t * cap
    else:
        t, x = None, raw.clone()
    x[:, vocab_size:] = float("-inf")
    return x, t


class ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of [N, V_padded] logits, chunked over rows; see the module docstring."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, cap: float) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        picked = torch.where(valid, targets, 0)[:, None]
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        rows = chunk_rows(logits)
        for start in range(0, logits.size(0), rows):
            end = start + rows
            x, _ = _chunk(logits, start, end, vocab_size, cap)
            lse[start:end] = chunk_lse = torch.logsumexp(x, dim=1)
            nll = chunk_lse - x.gather(1, picked[start:end]).squeeze(1)
            total = total + torch.where(valid[start:end], nll, 0.0).sum()
        count = valid.sum()
        ctx.save_for_backward(logits, picked, valid, lse, count)
        ctx.vocab_size, ctx.cap = vocab_size, cap
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, picked, valid, lse, count = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        scale = (grad / count).float()
        rows = chunk_rows(logits)
        for start in range(0, logits.size(0), rows):
            end = start + rows
            x, t = _chunk(logits, start, end, ctx.vocab_size, ctx.cap)
            g = torch.exp(x - lse[start:end, None])  # softmax; 0 on the padded columns
            g.scatter_add_(1, picked[start:end], torch.full_like(g[:, :1], -1.0))
            g *= valid[start:end, None] * scale
            if ctx.cap:
                g *= t.square_().neg_().add_(1)  # d cap·tanh(x/cap) / dx = 1 - tanh², in place
            grad_logits[start:end] = g.to(grad_logits.dtype)
        return grad_logits, None, None, None
