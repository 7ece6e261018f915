"""The language-model loss: mean next-token cross-entropy in fp32 over the real vocabulary.

Two implementations, the same number to fp32 rounding:

- ``reference``: slice the real vocabulary off the padded logits, copy them to fp32, ``F.cross_entropy`` —
  build-nanogpt's numerics, kept bit for bit for the reproduction recipe. At B=64, T=1024 and 50,304 columns
  that is a 13 GB fp32 copy plus 13 GB of log-probabilities saved for the backward pass.
- ``chunked``: the padded logits as they are (bf16 under autocast), rows taken a chunk at a time in fp32,
  padded columns masked inside the chunk instead of sliced off with a copy. The forward keeps only the
  per-row log-sum-exp; the backward recomputes each chunk's softmax and writes the gradient straight into a
  tensor of the logits' dtype. Peak extra memory is one fp32 chunk instead of two full fp32 copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # target value skipped by the loss (PyTorch's and Hugging Face's convention)
LOSS_KINDS = ("reference", "chunked")
CHUNK_ROWS = 8192  # rows per fp32 chunk: 1.6 GB at 50,304 columns, few enough chunks to compile quickly


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, kind: str = "reference") -> torch.Tensor:
    """Mean cross-entropy of ``logits`` [..., V_padded] against ``targets`` [...], over the first ``vocab_size``
    columns, skipping targets equal to ``IGNORE_INDEX`` (NaN when every target is skipped, as F.cross_entropy)."""
    if kind == "chunked":
        return ChunkedCrossEntropy.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), vocab_size)
    logits = logits[..., :vocab_size]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def _chunk_fp32(logits: torch.Tensor, start: int, vocab_size: int) -> torch.Tensor:
    """Rows ``start:start+CHUNK_ROWS`` in fp32, padded columns at -inf (they never reach the softmax)."""
    x = logits[start : start + CHUNK_ROWS].float()
    if x.size(1) > vocab_size:
        x[:, vocab_size:] = float("-inf")
    return x


class ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of [N, V_padded] logits, chunked over rows; see the module docstring."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        picked_targets = torch.where(valid, targets, 0)[:, None]
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.size(0), CHUNK_ROWS):
            x = _chunk_fp32(logits, start, vocab_size)
            chunk_lse = torch.logsumexp(x, dim=1)
            lse[start : start + CHUNK_ROWS] = chunk_lse
            nll = chunk_lse - x.gather(1, picked_targets[start : start + CHUNK_ROWS]).squeeze(1)
            total = total + torch.where(valid[start : start + CHUNK_ROWS], nll, 0.0).sum()
        count = valid.sum()
        ctx.save_for_backward(logits, picked_targets, valid, lse, count)
        ctx.vocab_size = vocab_size
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, picked_targets, valid, lse, count = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        scale = (grad / count).float()
        for start in range(0, logits.size(0), CHUNK_ROWS):
            end = start + CHUNK_ROWS
            probs = torch.exp(_chunk_fp32(logits, start, ctx.vocab_size) - lse[start:end, None])  # 0 on padding
            probs.scatter_add_(1, picked_targets[start:end], torch.full_like(probs[:, :1], -1.0))
            grad_logits[start:end] = (probs * (valid[start:end, None] * scale)).to(grad_logits.dtype)
        return grad_logits, None, None
