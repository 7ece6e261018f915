"""The language-model loss: mean next-token cross-entropy in fp32 over the real vocabulary.

Two implementations of the same number (to fp32 rounding), chosen by ``Runtime.loss``:

- ``reference``: the model slices the real vocabulary off its padded logits, the loss copies them to fp32 and
  calls ``F.cross_entropy`` — build-nanogpt's numerics, kept bit for bit for the reproduction recipe. At B=64,
  T=1024 and 50,304 columns that is a 13 GB fp32 copy plus 13 GB of log-probabilities kept for the backward.
- ``chunked``: the padded logits as the head produced them (bf16 under autocast), a chunk of rows at a time in
  fp32, the padded columns masked inside the chunk rather than sliced off with a copy, the soft cap (if any)
  applied per chunk. The forward keeps only each row's log-sum-exp; the backward recomputes a chunk's softmax
  and writes the gradient straight into a tensor of the logits' dtype. Peak extra memory: one fp32 chunk.

How big a chunk: on a GPU, and wherever the chunk functions are compiled (one fused pass per chunk), up to
``CHUNK_BYTES`` (few Python iterations, few kernel launches). Eager on a CPU each chunk goes through about a
dozen elementwise passes (cap, log-sum-exp, softmax, the cap's derivative), so the chunk is cut to
``CPU_EAGER_CHUNK_BYTES``, small enough to stay in cache from one pass to the next: 0.48–0.65× the time there
at 2,048 × 50,304 logits (``benchmarks/results/chunked-loss-cpu-chunk-size.md``). Each row's values and
gradient do not depend on the chunking; only the order in which the loss's per-chunk sums are added does.

The chunked loss is one custom op (``gpt2forge::chunked_cross_entropy``, with its backward another), so
``torch.compile`` sees one opaque node with a fake impl instead of the chunk loop unrolled (~50 copies of the
chunk's graph at B=64, T=1024). Inside, the per-chunk functions run eagerly when the caller is eager, and
compiled (one fused pass per chunk and direction) when the caller is being compiled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import IGNORE_INDEX

CHUNK_BYTES = 1 << 28  # one fp32 chunk: 256 MB (1,334 rows of 50,304 columns), whatever the batch
CPU_EAGER_CHUNK_BYTES = 1 << 21  # eager on a CPU: 2 MB (10 rows of 50,304 columns), kept in cache between passes
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
    fused = torch.compiler.is_compiling()  # a constant in the traced graph: compiled callers get fused chunks
    loss, _ = _chunked_loss(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), vocab_size, float(cap), form,
                            fused)
    return loss


def chunk_bytes(device_type: str, fused: bool) -> int:
    """The most one fp32 chunk may take: ``CHUNK_BYTES``, cut to cache size when running eagerly on a CPU."""
    return CHUNK_BYTES if fused or device_type != "cpu" else min(CHUNK_BYTES, CPU_EAGER_CHUNK_BYTES)


def chunk_rows(logits: torch.Tensor, fused: bool = False) -> int:
    """Rows per fp32 chunk of ``logits`` [rows, V]."""
    return max(1, chunk_bytes(logits.device.type, fused) // (4 * logits.size(1)))


def _capped(raw: torch.Tensor, vocab_size: int, cap: float, form: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk's capped fp32 logits with the padded columns at -inf, and the factor the backward turns in place
    into the cap's derivative (None without a cap): ``t = tanh(x/cap)`` (derivative 1 - t²) or
    ``s = cap/sqrt(x²+cap²)`` (capped = x·s, derivative cap³/(x²+cap²)^{3/2} = s³). The same operations as
    ``softcap``: on a CPU these passes over [rows, V] are most of the cap's cost, so each is done once."""
    raw = raw.float()
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


def _forward_chunk(raw: torch.Tensor, picked: torch.Tensor, valid: torch.Tensor, vocab_size: int, cap: float,
                   form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's per-row log-sum-exp and the sum of its valid rows' negative log-likelihoods."""
    x, _ = _capped(raw, vocab_size, cap, form)
    lse = torch.logsumexp(x, dim=1)
    nll = lse - x.gather(1, picked[:, None]).squeeze(1)  # a [rows] gather of the target logits
    return lse, torch.where(valid, nll, 0.0).sum()


def _backward_chunk(out: torch.Tensor, raw: torch.Tensor, picked: torch.Tensor, valid: torch.Tensor,
                    lse: torch.Tensor, scale: torch.Tensor, vocab_size: int, cap: float, form: str,
                    fused: bool) -> None:
    """Writes a chunk's gradient, (softmax - one_hot(target))·scale·cap', into ``out`` (the logits' dtype)."""
    x, t = _capped(raw, vocab_size, cap, form)
    g = x.sub_(lse[:, None]).exp_()  # softmax, in place; 0 on the padded columns
    if fused:  # elementwise, so it fuses into the chunk's one pass; p - 0 is p, so the values are the same
        g = torch.where(torch.arange(g.size(1), device=g.device) == picked[:, None], g - 1, g)
    else:  # eager: an index write at the [rows] targets, not a pass over the chunk
        rows = torch.arange(g.size(0), device=g.device)
        g[rows, picked] -= 1
    g *= valid[:, None] * scale
    if cap and form == "tanh":
        g *= t.square_().neg_().add_(1)  # d cap·tanh(x/cap) / dx = 1 - tanh², in place
    elif cap:
        g *= t.pow_(3)  # d cap·x/sqrt(x²+cap²) / dx = cap³/(x²+cap²)^{3/2} = s³, in place
    out.copy_(g)


_compiled_chunks: dict[str, object] = {}


def _chunk_fn(name: str, fused: bool):
    """The per-chunk function, compiled on first fused use (rows dynamic: one graph per dtype, cap and form)."""
    fn = {"forward": _forward_chunk, "backward": _backward_chunk}[name]
    if not fused:
        return fn
    if name not in _compiled_chunks:
        _compiled_chunks[name] = torch.compile(fn, dynamic=True)
    return _compiled_chunks[name]


def _same_dispatch_context():
    """Below ADInplaceOrView, as AOTAutograd's first call of a compiled graph runs custom ops (inside its aliasing
    check's dispatch mode): the chunk functions then see one dispatch key set on every call, so their compiled
    guards hold and each compiles once, not twice. Nothing in the chunk loop needs autograd's view tracking."""
    return torch._C._AutoDispatchBelowADInplaceOrView()


@torch.library.custom_op("gpt2forge::chunked_cross_entropy", mutates_args=())
def _chunked_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, cap: float, form: str,
                  fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-row log-sum-exp) of [N, V_padded] logits, chunked over rows."""
    valid = targets != IGNORE_INDEX
    picked = torch.where(valid, targets, 0)
    lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    forward, rows = _chunk_fn("forward", fused), chunk_rows(logits, fused)
    with _same_dispatch_context():
        for start in range(0, logits.size(0), rows):
            chunk = slice(start, start + rows)
            lse[chunk], nll = forward(logits[chunk], picked[chunk], valid[chunk], vocab_size, cap, form)
            total = total + nll
    return total / valid.sum(), lse


@_chunked_loss.register_fake
def _(logits, targets, vocab_size, cap, form, fused):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(logits.size(0), dtype=torch.float32)


@torch.library.custom_op("gpt2forge::chunked_cross_entropy_backward", mutates_args=())
def _chunked_loss_backward(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                           vocab_size: int, cap: float, form: str, fused: bool) -> torch.Tensor:
    """The logits' gradient, a chunk at a time, written in place into one tensor of the logits' dtype."""
    valid = targets != IGNORE_INDEX
    picked = torch.where(valid, targets, 0)
    grad_logits = torch.empty_like(logits)
    scale = (grad / valid.sum()).float()
    backward, rows = _chunk_fn("backward", fused), chunk_rows(logits, fused)
    with _same_dispatch_context():
        for start in range(0, logits.size(0), rows):
            chunk = slice(start, start + rows)
            backward(grad_logits[chunk], logits[chunk], picked[chunk], valid[chunk], lse[chunk], scale, vocab_size,
                     cap, form, fused)
    return grad_logits


@_chunked_loss_backward.register_fake
def _(grad, logits, targets, lse, vocab_size, cap, form, fused):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, targets, vocab_size, cap, form, fused = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.args = vocab_size, cap, form, fused
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad: torch.Tensor, _grad_lse: torch.Tensor | None):
    logits, targets, lse = ctx.saved_tensors
    return _chunked_loss_backward(grad, logits, targets, lse, *ctx.args), None, None, None, None, None


_chunked_loss.register_autograd(_backward, setup_context=_setup_context)
