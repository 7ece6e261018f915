"""GPT-2 in plain PyTorch: presets, initialisation, forward pass and KV-cached generation.

Parameter names follow OpenAI's GPT-2 checkpoint (``transformer.wte``, ``h.N.attn.c_attn``, ``mlp.c_fc``,
``ln_f``, ``lm_head``) so Hugging Face import/export is a short mapping (see ``hf.py``). The module is pure:
no file, network or distributed code lives here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tokenizer import EOT_TOKEN

IGNORE_INDEX = -100  # target value skipped by the loss (PyTorch's and Hugging Face's convention)
ATTENTION_KINDS = ("sdpa", "manual")


@dataclass
class GPTConfig:
    """Shape of a GPT-2 model."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # context length (number of learned positions)
    vocab_size: int = 50257  # real tokens; logits and the loss only ever cover these
    vocab_multiple: int = 1  # pad the embedding rows up to a multiple of this (128 → 50304) for faster matmuls
    attention: str = "sdpa"  # "sdpa": F.scaled_dot_product_attention (flash on GPU); "manual": explicit softmax
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for f in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "vocab_multiple"):
            value = getattr(self, f)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{f} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"model.attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),  # CPU tests and the quickstart
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def preset_config(name: str, **overrides) -> GPTConfig:
    """The GPTConfig of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated up to the context length.

    Buffers are allocated on first use with the dtype of the keys, so the cache follows autocast.
    """

    def __init__(self, config: GPTConfig, batch_size: int) -> None:
        self.shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k: list[torch.Tensor | None] = [None] * config.n_layer
        self.v: list[torch.Tensor | None] = [None] * config.n_layer
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


def causal_mask(n_query: int, n_key: int, device) -> torch.Tensor:
    """Boolean mask (True = may attend) for queries that are the last ``n_query`` of ``n_key`` positions."""
    return torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril(diagonal=n_key - n_query)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.attention = config.attention
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        S = k.size(2)
        if self.attention == "sdpa":
            if S == T:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, S, x.device))
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            att = att.masked_fill(~causal_mask(T, S, x.device), float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2·n_layer), zero biases."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weights once. ``non_embedding`` drops the position table (as nanoGPT's MFU does)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12·L·H·Q·T (PaLM appendix B)."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * seq_len

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits over the real vocabulary (padding sliced off) and, given targets, the mean cross-entropy."""
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)[..., : self.config.vocab_size]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return logits, loss

    @torch.no_grad()
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        stop_token: int | None = EOT_TOKEN,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, one step at a time.

        ``temperature=0`` is greedy. Rows that produced ``stop_token`` keep yielding it; iteration ends once
        every row has stopped. Past the context length the window slides: the model sees the last
        ``block_size`` tokens, exactly as without a cache (the cache is then rebuilt each step).
        """
        block = self.config.block_size
        cache = None
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        pending = idx  # tokens the model has not yet seen
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -block:])
            else:
                if cache is None or cache.pos + pending.size(1) > block:
                    cache = KVCache(self.config, idx.size(0))
                    pending = idx[:, -block:]
                logits, _ = self(pending, cache=cache)
            next_token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            if stop_token is not None:
                next_token = torch.where(done, torch.full_like(next_token, stop_token), next_token)
                done |= next_token == stop_token
            yield next_token
            idx = torch.cat([idx, next_token[:, None]], dim=1)
            pending = next_token[:, None]
            if stop_token is not None and bool(done.all()):
                return

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """``idx`` extended by up to ``max_new_tokens`` sampled tokens (see ``stream`` for the options)."""
        new = list(self.stream(idx, max_new_tokens, **kwargs))
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row from last-position logits [B, V]: greedy, or temperature / top-k / top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
