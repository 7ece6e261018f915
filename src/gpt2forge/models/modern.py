"""The modernised GPT of the speedrun's track 3 (modded-nanogpt ``records/track_3_optimization/train_gpt_simple.py``).

Rotary positions on half of each head, RMSNorm (pre-norm, after the embedding, and gain-free on q and k), ReLU²,
128-wide heads, biases, zero-initialised out-projections and an untied zero-initialised head, soft-capped logits.
Each choice is a config field whose default is track 3's, so an ablation switches one off. Parameter names
follow ``gpt2.py`` where the module is the same kind; q, k and v are separate matrices because Muon
orthogonalises each hidden matrix on its own.

Two later track-1 additions are switches, off by default (track 3 has neither): per-layer residual and x0
scalars (``residual_scalars``) and value embeddings (``value_embeds``). Left out on purpose: the value residual,
U-net skips and document-masked sliding windows, which tie the model to the data layout (document boundaries)
and to how evaluation chunks text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .common import DecoderLM, KVCache, ModelConfig, RMSNorm, Rotary, Runtime, apply_rotary, causal_attention
from .loss import SOFTCAP_FORMS, chunked_cross_entropy, cross_entropy, softcap

MLP_KINDS = ("relu2", "gelu")


@dataclass
class ModernConfig(ModelConfig):
    """Shape of a modern model: the size knobs of ``ModelConfig`` (defaults: track 3's 124M model), then one
    field per architectural choice, each defaulting to track 3's value."""

    arch: ClassVar[str] = "modern"
    stored_defaults: ClassVar[dict] = {"logit_softcap_form": "tanh"}
    """What a stored config that lacks a field meant (``models.config_from_dict``): it predates the field."""

    n_head: int = 6
    """Attention heads per block (track 3: 768 wide, heads of 128)."""
    rope_base: float = 1024.0
    """Rotary frequencies run geometrically from 1 down to exactly 1/rope_base radians per position (track 3:
    ``(1/1024) ** linspace(0, 1, head_dim/4)``, its "base freq tuning"; Llama's 10000 ends one step short)."""
    rope_fraction: float = 0.5
    """Fraction of each head's dims that rotate, the first ones; the rest carry no position (track 3: half).
    0 = no positional signal at all (NoPE); 1 = every dim rotates. Track 3 rotates dims [0, hs/4) with
    [hs/2, 3hs/4) instead: the same model up to a fixed reordering of q's and k's rows."""
    qk_norm: bool = True
    """RMSNorm (no gain) on each head's q and k before the rotation, bounding the attention logits (track 3)."""
    mlp: str = "relu2"
    """MLP activation: relu2 (ReLU(x)², track 3) or gelu (GPT-2's tanh-approximated GELU)."""
    embed_norm: bool = True
    """RMSNorm (with gain) right after the token embedding (track 3)."""
    tie_embeddings: bool = False
    """Share one matrix between the token embedding and the head (GPT-2); track 3 unties them (+V·C parameters)."""
    zero_init: bool = True
    """Zero-initialise the attention and MLP out-projections and an untied head, so every block starts as the
    identity and the first logits are uniform (track 3). Off: they get the other matrices' init."""
    logit_softcap: float = 15.0
    """Soft-cap the logits to (-cap, cap), in the form below; 0 = off (track 3: 15)."""
    logit_softcap_form: str = "algebraic"
    """algebraic: cap·x/sqrt(x² + cap²) (track 3), which saturates more slowly than tanh: cap·tanh(x/cap) (the
    track-1 records from #9 on, at 30 then 15). Weights files written before this field existed used tanh."""
    bias: bool = True
    """Biases on every linear layer, the head included (track 3 has them; modern LLMs usually drop them)."""
    attn_scale: float = 0.12
    """Multiplier of q·k before the softmax; 0 = 1/sqrt(head_dim) (0.088 at 128). Track 3 uses 0.12, tuned for
    qk_norm and 128-wide heads: with unit-RMS q and k the logits stay within ±0.12·head_dim."""
    residual_scalars: bool = False
    """Before each block, x ← λr·x + λ0·x0, x0 the normalised embedding and (λr, λ0) learned per layer from (1, 0):
    a block may damp the stream or re-read the tokens (modded-nanogpt record #9's x0 shortcut). Optimizer role
    ``lambda`` (optim.lambda_lr, never decayed). At init the model computes exactly what it does without them."""
    value_embeds: int = 0
    """Value embeddings: this many extra token-embedding tables (vocab × n_embd each), whose rows are added to
    attention's values through a learned gate per head, 2·sigmoid(w·x[:12]) (1 at init). Table i serves layers i and
    n_layer − value_embeds + i, the first and the last layers (as records #13–17 shared 3 tables among 6 layers).
    Optimizer roles: the tables ``value_embed`` (optim.value_embed_lr), the gates ``lambda``. 0 = off."""

    def validate(self) -> None:
        super().validate()
        for f in ("qk_norm", "embed_norm", "tie_embeddings", "zero_init", "bias", "residual_scalars"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"model.{f} must be true or false, got {getattr(self, f)!r}")
        if self.logit_softcap_form not in SOFTCAP_FORMS:
            raise ValueError(f"model.logit_softcap_form must be one of {', '.join(SOFTCAP_FORMS)}, "
                             f"got {self.logit_softcap_form!r}")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"model.mlp must be one of {', '.join(MLP_KINDS)}, got {self.mlp!r}")
        if not (isinstance(self.rope_base, (int, float)) and math.isfinite(self.rope_base) and self.rope_base > 0):
            raise ValueError(f"model.rope_base must be a positive number, got {self.rope_base!r}")
        dims = self.rope_fraction * self.head_dim
        if not 0 <= self.rope_fraction <= 1 or dims != int(dims) or int(dims) % 2:
            raise ValueError(f"model.rope_fraction ({self.rope_fraction}) must be in [0, 1] and rotate an even number "
                             f"of each head's {self.head_dim} dims (dims are rotated in pairs); got {dims:g}")
        if not (math.isfinite(self.logit_softcap) and self.logit_softcap >= 0):
            raise ValueError(f"model.logit_softcap must be ≥ 0 (0 = off), got {self.logit_softcap!r}")
        if not (math.isfinite(self.attn_scale) and self.attn_scale >= 0):
            raise ValueError(f"model.attn_scale must be ≥ 0 (0 = 1/sqrt(head_dim)), got {self.attn_scale!r}")
        k = self.value_embeds
        if not isinstance(k, int) or isinstance(k, bool) or k < 0 or 2 * k > self.n_layer:
            raise ValueError(f"model.value_embeds must be an integer from 0 to n_layer/2 = {self.n_layer // 2} (each "
                             f"table serves one of the first and one of the last layers), got {k!r}")

    def value_embed_table(self, layer: int) -> int | None:
        """Which value-embedding table ``layer`` adds to its values (None: none)."""
        k = self.value_embeds
        if layer < k:
            return layer
        return layer - (self.n_layer - k) if layer >= self.n_layer - k else None

    @property
    def rope_dims(self) -> int:
        """How many of each head's dims rotate."""
        return int(self.rope_fraction * self.head_dim)


PRESETS: dict[str, dict] = {  # GPT-2's sizes and names; the heads 128 wide where the width allows (track 3)
    "tiny": {"n_layer": 4, "n_head": 2, "n_embd": 128, "block_size": 256},  # CPU tests, quickstart: heads of 64
    "gpt2": {"n_layer": 12, "n_head": 6, "n_embd": 768},  # track 3's model: 162M untied, 124M tied
    "gpt2-medium": {"n_layer": 24, "n_head": 8, "n_embd": 1024},
    "gpt2-large": {"n_layer": 36, "n_head": 10, "n_embd": 1280},
    "gpt2-xl": {"n_layer": 48, "n_head": 10, "n_embd": 1600},  # 1600 has no split into 128s: heads of 160
}


VE_GATE_INPUTS = 12  # the value-embedding gate reads the first 12 channels of the block's normalised input


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModernConfig, layer: int, runtime: Runtime) -> None:
        super().__init__()
        self.layer, self.n_head, self.head_dim = layer, config.n_head, config.head_dim
        self.attention, self.scale, self.qk_norm = runtime.attention, config.attn_scale or None, config.qk_norm
        C = config.n_embd
        self.c_q = nn.Linear(C, C, bias=config.bias)
        self.c_k = nn.Linear(C, C, bias=config.bias)
        self.c_v = nn.Linear(C, C, bias=config.bias)
        self.c_proj = nn.Linear(C, C, bias=config.bias)
        if config.value_embed_table(layer) is not None:  # one gate per head, zero-init: 2·sigmoid(0) = 1
            self.ve_gate = nn.Linear(min(VE_GATE_INPUTS, C), config.n_head, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None, ve: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs) each
                   for lin in (self.c_q, self.c_k, self.c_v))
        if ve is not None:  # this layer's value embedding of the tokens (B, T, C), gated per head
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))  # (B, T, nh)
            v = v + gate.transpose(1, 2)[..., None] * ve.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))  # (B, nh, T, hs), unit RMS
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)  # (B, nh, T, hs): first rope_dims rotated
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, S, hs): the cached positions, then these
        y = causal_attention(q, k, v, self.attention, self.scale)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class _ReLUSquared(torch.autograd.Function):
    """relu(x)², keeping relu(x) for the backward g·(2·relu(x)): the values of ``F.relu(x).square()`` under
    autograd, bit for bit (×2 is exact), in two passes each way where autograd's chain takes five backward. On a
    CPU, eager, that is ~3× faster, and the activation was the modern step's largest elementwise cost."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return torch.mul(r, 2).mul_(grad)  # grad·(2r), bit for bit, with one temporary instead of two


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return _ReLUSquared.apply(x)


class MLP(nn.Module):
    def __init__(self, config: ModernConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.relu2 = config.mlp == "relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        h = relu_squared(h) if self.relu2 else F.gelu(h, approximate="tanh")
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config: ModernConfig, layer: int, runtime: Runtime) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer, runtime)
        self.ln_2 = RMSNorm(config.n_embd)
        self.mlp = MLP(config)
        if config.residual_scalars:
            self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # (λr, λ0)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None, x0: torch.Tensor | None = None,
                ve: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(self, "lambdas"):
            x = self.lambdas[0] * x + self.lambdas[1] * x0
        x = x + self.attn(self.ln_1(x), rope, cache, ve)
        return x + self.mlp(self.ln_2(x))


class ModernGPT(DecoderLM):
    """The modern GPT. The model contract (see ``models/__init__.py``): ``forward``, ``blocks``, ``num_params``,
    ``flops_per_token``, ``new_cache``, and the declarations below."""

    embedding_weights: ClassVar[tuple[str, ...]] = ("transformer.wte.weight",)
    head_weights: ClassVar[tuple[str, ...]] = ("lm_head.weight",)
    role_patterns: ClassVar[dict[str, str]] = {"transformer.ve.*.weight": "value_embed",
                                               "transformer.h.*.lambdas": "lambda",
                                               "transformer.h.*.attn.ve_gate.weight": "lambda"}

    @staticmethod
    def tied_weights(config: ModernConfig) -> dict[str, str]:
        """``{alias: source}``: the head is the token embedding only when ``tie_embeddings``."""
        return {"lm_head.weight": "transformer.wte.weight"} if config.tie_embeddings else {}

    def __init__(self, config: ModernConfig, runtime: Runtime | None = None) -> None:
        super().__init__()
        runtime = runtime or Runtime()
        self.config, self.loss = config, runtime.loss
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.padded_vocab_size, config.n_embd),
                "ln_emb": RMSNorm(config.n_embd) if config.embed_norm else nn.Identity(),
                "h": nn.ModuleList(Block(config, i, runtime) for i in range(config.n_layer)),
                "ln_f": RMSNorm(config.n_embd),
            }
        )
        if config.value_embeds:
            self.transformer["ve"] = nn.ModuleList(nn.Embedding(config.padded_vocab_size, config.n_embd)
                                                   for _ in range(config.value_embeds))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=config.bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # one table for every layer; None when nothing rotates
        self.rotary = Rotary(config.rope_dims, config.block_size, config.rope_base) if config.rope_dims else None
        self._init_weights()

    def _init_weights(self) -> None:
        """Track 3's init: matrices N(0, 0.33/fan_in) (its rounding of torch's default uniform init), the untied
        embedding N(0, 1) (torch's default; a norm follows it), biases 0, gains 1, then the out-projections and
        an untied head zeroed (``zero_init``). A tied matrix keeps the head's init: N(0, 1) would start the
        logits at about ±sqrt(n_embd). Value embeddings N(0, 0.01²) (small next to the values, ~0.57 RMS), their
        gates 0 (a gate of 1)."""
        c = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=(0.33 / module.in_features) ** 0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if not c.tie_embeddings:
            nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        if c.zero_init:
            outputs = [m for b in self.transformer.h for m in (b.attn.c_proj, b.mlp.c_proj)]
            for module in outputs + ([] if c.tie_embeddings else [self.lm_head]):
                nn.init.zeros_(module.weight)
        for table in self.transformer["ve"] if c.value_embeds else ():
            nn.init.normal_(table.weight, mean=0.0, std=0.01)
        for block in self.transformer.h:
            if hasattr(block.attn, "ve_gate"):
                nn.init.zeros_(block.attn.ve_gate.weight)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weights once. ``non_embedding`` drops the token embedding, a lookup without FLOPs,
        unless it is also the head (tied: a matmul, kept as GPT-2 keeps its own), and the value embeddings (lookups
        too); an untied head always counts."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        if non_embedding and self.config.value_embeds:
            n -= sum(table.weight.numel() for table in self.transformer["ve"])
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Soft-capped logits over the real vocabulary (padding sliced off) and, given targets, the mean
        cross-entropy of those logits (with the chunked loss, given targets, no logits: materialising them is
        what it avoids). With a cache, positions continue from ``cache.pos``."""
        T, c = idx.size(1), self.config
        start = self.first_position(T, cache)
        rope = self.rotary(start, T) if self.rotary is not None else None  # cos, sin: (T, rope_dims/2) each
        x = x0 = self.transformer.ln_emb(self.transformer.wte(idx))  # (B, T, C)
        ves = [table(idx) for table in self.transformer["ve"]] if c.value_embeds else []  # (B, T, C) each
        for i, block in enumerate(self.transformer.h):
            table = c.value_embed_table(i)
            x = block(x, rope, cache, x0, None if table is None else ves[table])
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V_padded)
        if targets is not None and self.loss == "chunked":
            return None, chunked_cross_entropy(logits, targets, c.vocab_size, c.logit_softcap, c.logit_softcap_form)
        logits = softcap(logits[..., : c.vocab_size], c.logit_softcap, c.logit_softcap_form)  # (B, T, V)
        loss = cross_entropy(logits, targets) if targets is not None else None
        return logits, loss
