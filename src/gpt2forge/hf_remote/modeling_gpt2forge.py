"""gpt2forge's ``modern`` architecture for Hugging Face ``transformers`` (remote code, ``trust_remote_code=True``).

Shipped by ``gpt2forge export`` with the weights; self-contained (``torch`` and ``transformers`` only). The
computation is gpt2forge's ``models/modern.py`` step for step, driven by the config's fields: rotary positions on
the first ``rope_fraction`` of each head (frequencies geometric from 1 to 1/``rope_base``), RMSNorm (after the
embedding when ``embed_norm``, gain-free on q and k when ``qk_norm``), ReLU² or GELU MLP, biases when ``bias``, the
head tied to the embedding when ``tie_embeddings``, logits soft-capped at ``logit_softcap`` (``logit_softcap_form``:
tanh or algebraic), per-layer residual and x0 scalars when ``residual_scalars``, ``value_embeds`` gated value-
embedding tables. Parameter names are gpt2forge's, so the weights file is its state dict with the vocabulary
padding cut off.

Beyond gpt2forge's forward: a ``transformers`` KV cache (``DynamicCache``) for ``generate``, and an
``attention_mask`` with ``position_ids`` for padded batches (rotary positions follow ``position_ids``).
"""

import dataclasses

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_gpt2forge import Gpt2forgeModernConfig

# transformers 5 calls the KV cache `cache`; earlier versions `past_key_values`: take either, return it as named
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def rms_norm(x, weight=None):
    """F.rms_norm with the input dtype's epsilon; a gain cast to the input's dtype (as gpt2forge's RMSNorm)."""
    return F.rms_norm(x, (x.size(-1),), None if weight is None else weight.type_as(x))


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight)


def rotary(positions, dims, base):
    """cos, sin of ``positions`` [B, T] for ``dims`` rotated dims: [B, 1, T, dims/2] each, computed in float64."""
    freq = base ** -torch.linspace(0, 1, dims // 2, dtype=torch.float64, device=positions.device)
    angle = positions.to(torch.float64)[..., None] * freq  # [B, T, dims/2]
    return angle.cos().float()[:, None], angle.sin().float()[:, None]


def apply_rotary(x, cos, sin):
    """Rotate dims [0, r/2) with [r/2, r) of each head of x [B, nh, T, hs]; the rest pass through."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat(((x1 * cos - x2 * sin).type_as(x), (x1 * sin + x2 * cos).type_as(x), rest), dim=-1)


def value_embed_table(config, layer):
    """The value-embedding table of ``layer`` (None: none): table i serves layers i and n_layer − value_embeds + i."""
    k = config.value_embeds
    if layer < k:
        return layer
    return layer - (config.n_layer - k) if layer >= config.n_layer - k else None


class Attention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer, self.n_head, self.head_dim = layer, config.n_head, config.n_embd // config.n_head
        self.qk_norm, self.scale = config.qk_norm, config.attn_scale or None
        C = config.n_embd
        self.c_q, self.c_k, self.c_v, self.c_proj = (nn.Linear(C, C, bias=config.bias) for _ in range(4))
        if value_embed_table(config, layer) is not None:
            self.ve_gate = nn.Linear(min(12, C), config.n_head, bias=False)

    def forward(self, x, rope, mask, cache, ve):
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2) for lin in (self.c_q, self.c_k,
                                                                                             self.c_v))
        if ve is not None:  # the tokens' value embedding, gated per head by 2·sigmoid(w·x[:12])
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))
            v = v + gate.transpose(1, 2)[..., None] * ve.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.relu2 = config.mlp == "relu2"

    def forward(self, x):
        h = self.c_fc(x)
        return self.c_proj(F.relu(h).square() if self.relu2 else F.gelu(h, approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1, self.attn = RMSNorm(config.n_embd), Attention(config, layer)
        self.ln_2, self.mlp = RMSNorm(config.n_embd), MLP(config)
        if config.residual_scalars:
            self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # (λr, λ0)

    def forward(self, x, rope, mask, cache, x0, ve):
        if hasattr(self, "lambdas"):
            x = self.lambdas[0] * x + self.lambdas[1] * x0
        x = x + self.attn(self.ln_1(x), rope, mask, cache, ve)
        return x + self.mlp(self.ln_2(x))


class Gpt2forgeModernForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = Gpt2forgeModernConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _tied_weights_keys = ({"lm_head.weight": "transformer.wte.weight"}
                          if int(transformers.__version__.split(".")[0]) >= 5 else ["lm_head.weight"])

    def __init__(self, config):
        super().__init__(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "ln_emb": RMSNorm(config.n_embd) if config.embed_norm else nn.Identity(),
            "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            "ln_f": RMSNorm(config.n_embd),
        })
        if config.value_embeds:
            self.transformer["ve"] = nn.ModuleList(nn.Embedding(config.vocab_size, config.n_embd)
                                                   for _ in range(config.value_embeds))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
        self.rope_dims = int(config.rope_fraction * (config.n_embd // config.n_head))
        self.post_init()

    def _init_weights(self, module):
        """The weights always come from the exported file; nothing to initialise."""

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, labels=None, **kwargs):
        B, T = input_ids.shape
        cache = cache if cache is not None else past_key_values
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        start = cache.get_seq_length() if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {self.config.block_size}")
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        mask = None  # None: plain causal attention (SDPA's is_causal), as gpt2forge computes it
        padded = attention_mask is not None and not bool(attention_mask.all())
        if padded or start > 0:
            S, device = start + T, input_ids.device
            mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)[None, None]  # [1, 1, T, S]
            if padded:  # padding keys masked; each query still sees itself (an all-masked row would give NaN)
                own = torch.zeros(T, S, dtype=torch.bool, device=device)
                own[torch.arange(T), torch.arange(T) + S - T] = True
                mask = (mask & attention_mask[:, None, None, -S:].bool()) | own
        rope = rotary(position_ids, self.rope_dims, self.config.rope_base) if self.rope_dims else None
        x = x0 = self.transformer.ln_emb(self.transformer.wte(input_ids))
        ves = [table(input_ids) for table in self.transformer["ve"]] if self.config.value_embeds else []
        for i, block in enumerate(self.transformer.h):
            table = value_embed_table(self.config, i)
            x = block(x, rope, mask, cache if use_cache else None, x0, None if table is None else ves[table])
        logits = self.lm_head(self.transformer.ln_f(x))
        cap = self.config.logit_softcap
        if cap and self.config.logit_softcap_form == "algebraic":  # cap·x/sqrt(x² + cap²)
            x = logits.float()
            logits = x * (x.square() + cap * cap).rsqrt().mul(cap)
        elif cap:
            logits = cap * torch.tanh(logits.float() / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
