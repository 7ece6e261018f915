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
SOFTCAP_FORMS = ("tanh", "algebraic")


def softcap(logits: torch.Tensor, cap: float, form: str = "tanh") -> torch.Tensor:
    """The logit soft cap in fp32 (bf16 steps are 1/16 near a cap of 15); ``cap=0`` = unchanged.
    ``tanh``: ``cap·tanh(x/cap)`` (Gemma 2); ``algebraic``: ``cap·x/sqrt(x²+cap²)`` (modded-nanogpt track 3),
    computed as ``x·s`` with ``s = cap/sqrt(x²+cap²)``, the same operations as the chunked loss."""
    if not cap:
        return logits
    if form == "tanh":
        return cap * torch.tanh(logits.float() / cap)
    if form == "algebraic":
        x = logits.float()
        return x * (x.square() + cap * cap).rsqrt().mul(cap)
    raise ValueError(f"soft-cap form must be one of {SOFTCAP_FORMS}, got {form!r}")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference loss on logits already cut to the real vocabulary (and capped)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                          cap: float = 0.0, form: str = "tanh") -> torch.Tensor:
    """The chunked loss on the head's padded logits [..., V_padded], soft-capped as ``softcap(…, cap, form)``;
    NaN when every target is ignored."""
    if form not in SOFTCAP_FORMS:
        raise ValueError(f"soft-cap form must be one of {SOFTCAP_FORMS}, got {form!r}")
    return ChunkedCrossEntropy.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), vocab_size, cap,
                                     form)


def chunk_rows(logits: torch.Tensor) -> int:
    return max(1, CHUNK_BYTES // (4 * logits.size(1)))


def _chunk(logits: torch.Tensor, start: int, end: int, vocab_size: int, cap: float,
           form: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``start:end``: capped fp32 logits with the padded columns at -inf, and the factor the backward turns
    in place into the cap's derivative (None without a cap): ``t = tanh(x/cap)`` (derivative 1 - t²) or
    ``s = cap/sqrt(x²+cap²)`` (capped = x·s, derivative cap³/(x²+cap²)^{3/2} = s³). The same operations as
    ``softcap``: on a CPU these passes over [rows, V] are most of the cap's cost, so each is done once."""
    raw = logits[start:end].float()
    if cap and form == "tanh":
        t = (raw / cap).tanh_()
        x = t * cap
    elif cap:
        t = raw.square().add_(cap * cap).rsqrt_().mul_(cap)
        x = raw * t
    else:
        t, x = None, raw.clone()
    x[:, vocab_size:] = float("-inf")
    return x, t


class ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of [N, V_padded] logits, chunked over rows; see the module docstring."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, cap: float,
                form: str) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        picked = torch.where(valid, targets, 0)[:, None]
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        rows = chunk_rows(logits)
        for start in range(0, logits.size(0), rows):
            end = start + rows
            x, _ = _chunk(logits, start, end, vocab_size, cap, form)
            lse[start:end] = chunk_lse = torch.logsumexp(x, dim=1)
            nll = chunk_lse - x.gather(1, picked[start:end]).squeeze(1)
            total = total + torch.where(valid[start:end], nll, 0.0).sum()
        count = valid.sum()
        ctx.save_for_backward(logits, picked, valid, lse, count)
        ctx.vocab_size, ctx.cap, ctx.form = vocab_size, cap, form
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, picked, valid, lse, count = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        scale = (grad / count).float()
        rows = chunk_rows(logits)
        for start in range(0, logits.size(0), rows):
            end = start + rows
            x, t = _chunk(logits, start, end, ctx.vocab_size, ctx.cap, ctx.form)
            g = torch.exp(x - lse[start:end, None])  # softmax; 0 on the padded columns
            g.scatter_add_(1, picked[start:end], torch.full_like(g[:, :1], -1.0))
            g *= valid[start:end, None] * scale
            if ctx.cap and ctx.form == "tanh":
                g *= t.square_().neg_().add_(1)  # d cap·tanh(x/cap) / dx = 1 - tanh², in place
            elif ctx.cap:
                g *= t.pow_(3)  # d cap·x/sqrt(x²+cap²) / dx = cap³/(x²+cap²)^{3/2} = s³, in place
            grad_logits[start:end] = g.to(grad_logits.dtype)
        return grad_logits, None, None, None, None
