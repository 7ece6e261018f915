"""What every architecture shares: the size knobs of its config, the KV cache, causal attention, the loss, and the
building blocks more than one architecture may use (RMSNorm, rotary position embedding).

Pure PyTorch: nothing here (or anywhere in ``models/``) imports the rest of the package, so a model file can be
read, tested and reused on its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # target value skipped by the loss (PyTorch's and Hugging Face's convention)
ATTENTION_KINDS = ("sdpa", "manual")
LOSS_KINDS = ("reference", "chunked")  # models/loss.py


@dataclass
class ModelConfig:
    """Size knobs every architecture has. Subclasses add their own fields (each with a docstring) and set
    ``arch``; the run config's ``[model]`` table is exactly one of these, so a field is added in one place."""

    arch: ClassVar[str] = ""

    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block."""
    n_embd: int = 768
    """Width of the residual stream."""
    block_size: int = 1024
    """Context length: the longest sequence the model reads."""
    vocab_size: int = 50257
    """Real vocabulary size: GPT-2's 50,257. Logits and the loss only ever cover these. Smaller only for tests
    with synthetic token ids (sampling, HellaSwag and Hugging Face export assume GPT-2's tokenizer)."""
    vocab_multiple: int = 128
    """Pad the embedding (and head) rows up to a multiple of this (128: 50257 → 50304, faster matmuls on GPUs);
    1 = no padding. The padded rows never reach the softmax."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field (as ``model.<field>``) when a value cannot build a model."""
        for f in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "vocab_multiple"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{f} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    def to_dict(self) -> dict:
        """``{"arch": ..., field: value, ...}``: what weights files and run configs store."""
        return {"arch": self.arch, **asdict(self)}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class Runtime:
    """How a model computes, not what it is: never stored with the weights, free to change between launches
    (so a checkpoint's architecture check ignores it)."""

    attention: str = "sdpa"
    """sdpa (F.scaled_dot_product_attention: flash on GPUs) or manual (explicit masked softmax, for teaching)."""
    loss: str = "reference"
    """reference (an fp32 copy of the sliced logits, F.cross_entropy) or chunked (fp32 a chunk of rows at a
    time, no full copy; with targets, ``forward`` then returns no logits). See ``models/loss.py``."""

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}, got {self.loss!r}")


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated up to the context length.

    Buffers are allocated on first use with the dtype of the keys, so the cache follows autocast.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, block_size: int, head_dim: int) -> None:
        self.block_size = block_size
        self.shape = (batch_size, n_head, block_size, head_dim)
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.pos = 0  # number of positions filled

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values for ``layer``; return all keys/values up to and including them."""
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(self.shape)
            self.v[layer] = v.new_zeros(self.shape)
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class DecoderLM(nn.Module):
    """What every architecture's model shares of the contract (``models/__init__.py``): its blocks live in
    ``self.transformer.h``, its config has n_layer/n_head/head_dim/block_size, and it defines ``num_params``."""

    config: ModelConfig

    @property
    def blocks(self) -> nn.ModuleList:
        """The repeated blocks: FSDP shards each on its own."""
        return self.transformer.h

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12·L·H·Q·T (PaLM appendix B, nanoGPT's MFU)."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * seq_len

    def new_cache(self, batch_size: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, c.block_size, c.head_dim)

    def first_position(self, n_tokens: int, cache: KVCache | None) -> int:
        """Where ``n_tokens`` new tokens start (after the cache's), refusing more than the context holds."""
        start = cache.pos if cache is not None else 0
        if start + n_tokens > self.config.block_size:
            raise ValueError(f"sequence of {start + n_tokens} tokens exceeds the context length "
                             f"{self.config.block_size}")
        return start


def causal_mask(n_query: int, n_key: int, device) -> torch.Tensor:
    """Boolean mask (True = may attend) for queries that are the last ``n_query`` of ``n_key`` positions."""
    return torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril(diagonal=n_key - n_query)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, scale: float | None = None
) -> torch.Tensor:
    """Causal attention of queries ``q`` (B, nh, T, hs) over keys/values (B, nh, S, hs), S ≥ T: the queries are
    the last T positions (S > T when a KV cache holds earlier ones). ``scale`` defaults to 1/sqrt(hs)."""
    T, S = q.size(2), k.size(2)
    if kind == "sdpa":
        if S == T:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, q.device), scale=scale)
    att = q @ k.transpose(-2, -1)  # (B, nh, T, S)
    att = att / math.sqrt(k.size(-1)) if scale is None else att * scale
    att = att.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
    return F.softmax(att, dim=-1) @ v  # (B, nh, T, hs)


class RMSNorm(nn.Module):
    """x / rms(x) · gain: LayerNorm without centring or bias, cheaper and as good (Zhang & Sennrich 2019).

    ``eps`` None is F.rms_norm's default, the input dtype's machine epsilon (as the speedrun). The gain is cast to
    the input's dtype so the fused kernel runs under autocast (a float32 gain on bf16 input falls back).
    """

    def __init__(self, dim: int, eps: float | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight.type_as(x), self.eps)


class Rotary(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021) tables for the first ``dims`` dims of a head.

    Rotating q and k of position p by angles p·ω makes q·k depend on positions only through their distance.
    The ``dims / 2`` frequencies ω are geometric from 1 down to exactly 1/``base`` radians per position (the
    speedrun's spacing; Llama's ``base^(-2i/dims)`` stops one step short of 1/base). cos/sin of every position
    of the context are computed once, in float64 then stored float32, as non-persistent buffers: they never
    enter a state dict and follow ``.to(device)``.
    """

    def __init__(self, dims: int, max_len: int, base: float) -> None:
        super().__init__()
        freq = base ** -torch.linspace(0, 1, dims // 2, dtype=torch.float64)  # (dims/2,) radians per position
        angle = torch.outer(torch.arange(max_len, dtype=torch.float64), freq)  # (max_len, dims/2)
        self.register_buffer("cos", angle.cos().float(), persistent=False)
        self.register_buffer("sin", angle.sin().float(), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of positions start … start+length-1: (length, dims/2) each, views of the tables."""
        return self.cos[start : start + length], self.sin[start : start + length]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2·cos.size(-1)`` dims of each head of ``x`` (B, nh, T, hs) by the angles of its T
    positions (``cos``/``sin`` (T, r/2) from ``Rotary``); the other dims pass through unchanged. Dim i is paired
    with dim i + r/2 (the half-split layout). Computed in at least float32, returned in x's dtype."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]  # (B, nh, T, r/2), ..., (B, nh, T, hs-r)
    y1 = x1 * cos - x2 * sin  # cos/sin broadcast over (B, nh)
    y2 = x1 * sin + x2 * cos
    return torch.cat((y1.type_as(x), y2.type_as(x), rest), dim=-1)  # (B, nh, T, hs)
