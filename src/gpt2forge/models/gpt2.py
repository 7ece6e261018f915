"""GPT-2 exactly: learned positions, LayerNorm, GELU (tanh), fused q/k/v, head tied to the token embedding.

Parameter names follow OpenAI's GPT-2 checkpoint (``transformer.wte``, ``h.N.attn.c_attn``, ``mlp.c_fc``,
``ln_f``, ``lm_head``) so Hugging Face import/export is a short mapping (see ``hf.py``). Init: N(0, 0.02),
residual projections scaled by 1/sqrt(2·n_layer), zero biases, as GPT-2 and build-nanogpt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import DecoderLM, KVCache, ModelConfig, Runtime, causal_attention
from .loss import chunked_cross_entropy, cross_entropy


@dataclass
class GPTConfig(ModelConfig):
    """Shape of a GPT-2 model (the size knobs of ``ModelConfig``, plus GPT-2's own)."""

    arch: ClassVar[str] = "gpt2"

    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon (GPT-2: 1e-5)."""


PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),  # CPU tests and the quickstart
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int, runtime: Runtime) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.attention = runtime.attention
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, S, hs): the cached positions, then these
        y = causal_attention(q, k, v, self.attention)  # (B, nh, T, hs)
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
    def __init__(self, config: GPTConfig, layer: int, runtime: Runtime) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer, runtime)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(DecoderLM):
    """GPT-2. The model contract (see ``models/__init__.py``): ``forward``, ``blocks``, ``num_params``,
    ``flops_per_token``, ``new_cache``, and the declarations below."""

    embedding_weights: ClassVar[tuple[str, ...]] = ("transformer.wte.weight", "transformer.wpe.weight")
    head_weights: ClassVar[tuple[str, ...]] = ("lm_head.weight",)

    @staticmethod
    def tied_weights(config: GPTConfig | None = None) -> dict[str, str]:
        """GPT-2's head is its token embedding: ``{alias: source}``."""
        return {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPTConfig, runtime: Runtime | None = None) -> None:
        super().__init__()
        runtime = runtime or Runtime()
        self.config, self.loss = config, runtime.loss
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList(Block(config, i, runtime) for i in range(config.n_layer)),
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

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits over the real vocabulary (padding sliced off) and, given targets, the mean cross-entropy (with
        the chunked loss, given targets, no logits: materialising them is what it avoids)."""
        T = idx.size(1)
        start = self.first_position(T, cache)
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is not None and self.loss == "chunked":
            return None, chunked_cross_entropy(self.lm_head(x), targets, self.config.vocab_size)
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # (B, T, V)
        loss = cross_entropy(logits, targets) if targets is not None else None
        return logits, loss
