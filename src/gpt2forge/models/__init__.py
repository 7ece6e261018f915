"""The model registry, keyed by ``[model] arch``, and the contract every architecture fulfils.

The contract is what the training loop, evaluation, sampling, FSDP, checkpoints and export rely on:

- ``forward(idx, targets=None, cache=None) -> (logits, loss)``: logits [B, T, vocab_size] over the real
  vocabulary; with targets, the mean cross-entropy (targets equal to ``IGNORE_INDEX`` skipped); with a
  ``KVCache`` (from ``new_cache(batch_size)``), ``idx`` continues the cached positions.
- ``config``: a ``ModelConfig`` (``block_size``, ``vocab_size``, ``arch``, ...), stored with the weights.
- ``blocks``: the repeated blocks (FSDP shards each one).
- ``num_params(non_embedding=False)`` and ``flops_per_token(seq_len)`` (for MFU).
- ``tied_weights(config)`` (a static method: asked without an instance): ``{alias: source}`` state-dict names
  that are one tensor (GPT-2's head is its token embedding). Weights files store the source only and restore
  the alias: nothing outside the model hard-codes a tie, so an untied head is saved and loaded as itself.
- ``embedding_weights`` / ``head_weights``: parameter names with those roles, which the optimizer builder uses
  to group parameters (the other roles are hidden matrices, ≥ 2-D, and gains/biases, < 2-D); optionally
  ``role_patterns``, ``{fnmatch pattern: role}`` for parameters of other roles (modern's lambda, value_embed).

``common.DecoderLM`` implements ``blocks``, ``flops_per_token`` and ``new_cache`` for a model that keeps its
blocks in ``transformer.h``, as both architectures here do. Model files import nothing from the rest of the
package. Sampling policy (temperature, top-k, top-p) lives in ``gpt2forge.sample``; file formats in
``gpt2forge.weights`` and ``gpt2forge.hf``.
"""

from __future__ import annotations

import fnmatch
import math
import typing
from dataclasses import dataclass

import torch.nn as nn

from . import gpt2, modern
from .common import IGNORE_INDEX, ModelConfig, Runtime

__all__ = ["ARCHITECTURES", "IGNORE_INDEX", "Architecture", "ModelConfig", "Runtime", "architecture",
           "build_model", "config_from_dict", "make_config", "padding_params", "parameter_roles", "tied_weights"]


@dataclass(frozen=True)
class Architecture:
    name: str
    config_class: type[ModelConfig]
    model_class: type[nn.Module]
    presets: dict[str, dict]
    default_preset: str
    summary: str

    def field_types(self) -> dict[str, type]:
        hints = typing.get_type_hints(self.config_class)
        return {name: hints[name] for name in self.config_class.field_names()}


ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture("gpt2", gpt2.GPTConfig, gpt2.GPT, gpt2.PRESETS, "gpt2",
                         "GPT-2 exactly (learned positions, LayerNorm, GELU, tied head)"),
    "modern": Architecture("modern", modern.ModernConfig, modern.ModernGPT, modern.PRESETS, "gpt2",
                           "speedrun track 3 (half RoPE, RMSNorm + QK-norm, ReLU², untied zero-init head, softcap)"),
}


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"model.arch {name!r} is unknown; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def make_config(arch: str = "gpt2", preset: str | None = None, **fields) -> ModelConfig:
    """The config of ``arch``: its preset (default: the architecture's default), then ``fields`` on top.
    Raises ValueError naming the key for an unknown preset, field or a value that cannot build a model."""
    spec = architecture(arch)
    preset = preset or spec.default_preset
    if preset not in spec.presets:
        raise ValueError(f"model.preset {preset!r} is unknown for arch {arch}; choose one of {', '.join(spec.presets)}")
    unknown = sorted(set(fields) - set(spec.config_class.field_names()))
    if unknown:
        raise ValueError(f"unknown model key(s) {', '.join('model.' + k for k in unknown)} for arch {arch}; "
                         f"it has: {', '.join(spec.config_class.field_names())}")
    return spec.config_class(**{**spec.presets[preset], **fields})


def config_from_dict(stored: dict) -> ModelConfig:
    """A config from what ``ModelConfig.to_dict`` stored. Older files have no ``arch`` (GPT-2) and carried the
    attention kernel, a runtime choice now (dropped)."""
    fields = {k: v for k, v in stored.items() if k not in ("arch", "attention")}
    spec = architecture(stored.get("arch", "gpt2"))
    fields = {**getattr(spec.config_class, "stored_defaults", {}), **fields}  # fields older files lack
    unknown = sorted(set(fields) - set(spec.config_class.field_names()))
    if unknown:
        raise ValueError(f"unknown model config keys {unknown} for arch {spec.name}")
    return spec.config_class(**fields)


def tied_weights(config: ModelConfig) -> dict[str, str]:
    """``{alias: source}`` of the weights ``config``'s architecture ties (stored once, restored on reading)."""
    return architecture(config.arch).model_class.tied_weights(config)


def build_model(config: ModelConfig, runtime: Runtime | None = None) -> nn.Module:
    """A freshly initialised model of ``config``'s architecture (seed torch's RNG first for a reproducible init)."""
    return architecture(config.arch).model_class(config, runtime or Runtime())


def padding_params(model: nn.Module) -> int:
    """Parameters that only exist for the vocabulary padding (the padded rows of the embedding, an untied head
    and its bias): what to subtract to compare counts with unpadded models."""
    c = model.config
    extra = c.padded_vocab_size - c.vocab_size
    padded = [p for p in model.parameters() if p.dim() and p.shape[0] == c.padded_vocab_size]
    return sum(extra * math.prod(p.shape[1:]) for p in padded)


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """``{name: role}`` for every trainable parameter (tied ones once): ``embedding`` and ``head`` as the model
    declares them (``role_patterns`` too), ``matrix`` for the other ≥ 2-D weights, ``scalar`` for gains and biases."""
    roles = {}
    patterns = getattr(model, "role_patterns", {})
    for name, p in model.named_parameters():  # named_parameters yields a tied tensor once, under its first name
        if not p.requires_grad:
            continue
        declared = next((role for pattern, role in patterns.items() if fnmatch.fnmatchcase(name, pattern)), None)
        if declared:
            roles[name] = declared
        elif name in model.embedding_weights:
            roles[name] = "embedding"
        elif name in model.head_weights:
            roles[name] = "head"
        else:
            roles[name] = "matrix" if p.dim() >= 2 else "scalar"
    return roles
