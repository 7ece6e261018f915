"""Model weights on disk: our safetensors format, and ``load_model`` for anything a user may point at.

Our ``model.safetensors`` carries the model's GPTConfig in its metadata, so a weights file is self-describing
(no pickled objects, unlike ``torch.save`` checkpoints). ``load_model`` accepts a checkpoint directory
(``step-NNNNNN/``), a run directory (follows its ``latest`` pointer), a Hugging Face GPT-2 directory, or a hub
name when online.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import UserError
from .hf import load_hf_model, load_state_checked
from .model import GPT, GPTConfig

MODEL_FILE = "model.safetensors"
CONFIG_KEY = "gpt2forge.model_config"
LATEST = "latest"  # file in a run directory naming its newest complete checkpoint


def save_weights(state: dict[str, torch.Tensor], config: GPTConfig, directory: str | os.PathLike) -> Path:
    """Write a GPT state dict and its config to ``directory/model.safetensors`` (tied lm_head stored once)."""
    path = Path(directory) / MODEL_FILE
    tensors = {k: v.detach().contiguous() for k, v in state.items() if k != "lm_head.weight"}
    save_file(tensors, path, metadata={"format": "pt", CONFIG_KEY: json.dumps(config.to_dict())})
    return path


def save_model(model: GPT, directory: str | os.PathLike) -> Path:
    return save_weights(model.state_dict(), model.config, directory)


def read_model_config(path: Path) -> GPTConfig | None:
    """The GPTConfig stored in one of our weights files, or None for a safetensors file of another origin."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file: {e}") from None
    if CONFIG_KEY not in metadata:
        return None
    try:
        return GPTConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: bad model config in metadata: {e}") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full state dict of one of our weights files, the tied ``lm_head.weight`` restored (on the CPU)."""
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file: {e}") from None
    if "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]  # the tie
    return state


def load_weights(model: GPT, path: Path) -> None:
    """Load our weights file into an existing model (same architecture), with a clear error otherwise."""
    load_state_checked(model, read_weights(path), str(path))


def our_checkpoint(path: str | os.PathLike) -> Path | None:
    """The gpt2forge checkpoint directory behind ``path`` (a run directory resolves through ``latest``), or None
    when it is something else: a Hugging Face directory or a hub name."""
    directory = resolve_checkpoint_dir(path)
    weights = directory / MODEL_FILE
    return directory if weights.is_file() and read_model_config(weights) is not None else None


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A run directory resolves to the checkpoint its ``latest`` pointer names; other paths are returned as is."""
    path = Path(path)
    latest = path / LATEST
    if latest.is_file():
        target = path / latest.read_text().strip()
        if not target.is_dir():
            raise UserError(f"{latest} points to {target.name}, which does not exist")
        return target
    return path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", **config_overrides) -> GPT:
    """A GPT from our checkpoint/run directory, a Hugging Face directory or a hub name, in eval mode.

    ``config_overrides`` change runtime-only fields (``attention``, ``vocab_multiple``) of the stored config.
    """
    directory = resolve_checkpoint_dir(path)
    weights = directory / MODEL_FILE
    config = read_model_config(weights) if weights.is_file() else None
    if config is not None:
        config = GPTConfig.from_dict({**config.to_dict(), **config_overrides})
        model = GPT(config)
        load_weights(model, weights)
    elif (directory / "config.json").is_file() or not directory.exists():
        model = load_hf_model(directory if directory.exists() else str(path), **config_overrides)
    elif directory.is_dir():
        raise UserError(
            f"{directory} is neither a gpt2forge checkpoint ({MODEL_FILE} with a model config) nor a run directory "
            f"(with a '{LATEST}' file) nor a Hugging Face model directory (with config.json)"
        )
    else:
        raise UserError(f"{directory} is a file; pass the checkpoint directory that holds it")
    return model.to(device).eval()
