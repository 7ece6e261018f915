"""Model weights on disk: our safetensors format, and ``load_model`` for anything a user may point at.

Our ``model.safetensors`` carries the model's config (with its ``arch``) in the metadata, so a weights file is
self-describing (no pickled objects, unlike ``torch.save`` checkpoints). Weights the architecture declares tied
(``tied_weights``: GPT-2's head is its token embedding) are stored once and restored on reading; every other
tensor, an untied head included, is stored as itself. A *sharded* checkpoint (FSDP runs) has no weights file: its
model and optimizer state are ``torch.distributed.checkpoint`` shards in ``sharded/``, its config in
``model_config.json``; ``load_model`` reads the model out of those shards into one full model, in one process.
``load_model`` accepts a checkpoint directory (``step-NNNNNN/``, full or sharded), a run directory (follows its
``latest`` pointer), a Hugging Face GPT-2 directory, or a hub name when online.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import UserError
from .files import as_if_opened
from .hf import read_hf_model
from .models import ModelConfig, Runtime, build_model, config_from_dict, tied_weights
from .runs import LATEST, resolve_checkpoint_dir

MODEL_FILE = "model.safetensors"
CONFIG_KEY = "gpt2forge.model_config"
SHARDED_DIR = "sharded"  # a sharded checkpoint's model and optimizer state: one file per rank and DCP's .metadata
SHARDED_MODEL_KEY = "model"  # the model's entry in that state ({"model": ..., "optimizers": ...})
MODEL_CONFIG_FILE = "model_config.json"  # a sharded checkpoint's model config (no weights file carries it)


def save_weights(state: dict[str, torch.Tensor], config: ModelConfig, directory: str | os.PathLike) -> Path:
    """Write a model's state dict and config to ``directory/model.safetensors`` (tied aliases stored once),
    creating ``directory`` if needed; the file is as readable as any other the process writes (not 0600)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / MODEL_FILE
    aliases = tied_weights(config)
    tensors = {k: v.detach().contiguous() for k, v in state.items() if k not in aliases}
    save_file(tensors, path, metadata={"format": "pt", CONFIG_KEY: json.dumps(config.to_dict())})
    as_if_opened(path)
    return path


def save_model(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    return save_weights(model.state_dict(), model.config, directory)


def read_model_config(path: Path) -> ModelConfig | None:
    """The config stored in one of our weights files, or None for a safetensors file of another origin."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file: {e}") from None
    if CONFIG_KEY not in metadata:
        return None
    try:
        return config_from_dict(json.loads(metadata[CONFIG_KEY]))
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: bad model config in metadata: {e}") from None


def read_weights(path: Path, config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """The full state dict of one of our weights files (on the CPU), tied aliases restored."""
    config = config or read_model_config(path)
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file: {e}") from None
    if config is not None:
        for alias, source in tied_weights(config).items():
            if source in state:
                state[alias] = state[source]
    return state


def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load weights strictly, turning key or shape mismatches into one message naming the source."""
    problem = state_mismatch(model, state)
    if problem:
        raise UserError(f"{origin}: {problem}")
    model.load_state_dict(state)


def state_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``state`` from loading strictly into ``model`` (missing/unexpected keys, shapes), or None.
    Shapes are global ones, so an FSDP-sharded model (DTensors) is checked against a full state too."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}{' …' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}{' …' if len(unexpected) > 4 else ''}")
        if wrong:
            parts.append(f"wrong shapes {wrong[:3]}")
        c = model.config
        return f"weights do not fit a {c.n_layer}-layer {c.arch} model: " + "; ".join(parts)
    return None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load our weights file into an existing model (same architecture), with a clear error otherwise."""
    load_state_checked(model, read_weights(path, model.config), str(path))


def load_sharded_weights(model: torch.nn.Module, directory: Path) -> None:
    """Fill ``model`` (full, unsharded) from a sharded checkpoint's shards, whatever the number of ranks that
    wrote them, in this process alone (no process group): each tensor is read into the model's own storage."""
    import torch.distributed.checkpoint as dcp

    aliases = tied_weights(model.config)  # restored by the tie itself
    state = {k: v for k, v in model.state_dict().items() if k not in aliases}
    one_process_quietly()
    try:
        dcp.load({SHARDED_MODEL_KEY: state}, checkpoint_id=directory / SHARDED_DIR, no_dist=True)
    except Exception as e:  # DCP wraps a reader's failures in its CheckpointException
        raise UserError(f"{directory / SHARDED_DIR}: the model's shards cannot be read ({type(e).__name__}: "
                        f"{str(e)[:300]})") from None


def one_process_quietly() -> None:
    """DCP in one process (``no_dist``) warns that it assumes one process, which is what was asked; the warning
    comes from the background writer's thread too, so the filter is the process's."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def checkpoint_model_config(directory: Path) -> ModelConfig | None:
    """The model config of one of our checkpoints, full (in the weights file) or sharded (``model_config.json``
    next to ``sharded/``); None for a directory that is neither."""
    if (directory / MODEL_FILE).is_file():
        return read_model_config(directory / MODEL_FILE)
    path = directory / MODEL_CONFIG_FILE
    if not (path.is_file() and (directory / SHARDED_DIR).is_dir()):
        return None
    try:
        return config_from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: unreadable model config ({e})") from None


def our_checkpoint(path: str | os.PathLike) -> Path | None:
    """The gpt2forge checkpoint directory behind ``path`` (a run directory resolves through ``latest``), or None
    when it is something else: a Hugging Face directory or a hub name."""
    directory = resolve_checkpoint_dir(path)
    return directory if checkpoint_model_config(directory) is not None else None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", runtime: Runtime | None = None,
               vocab_multiple: int | None = None) -> torch.nn.Module:
    """A model from our checkpoint/run directory, a Hugging Face directory or a hub name, in eval mode.

    ``runtime`` picks how it computes (attention kernel); ``vocab_multiple`` re-pads the vocabulary of a
    Hugging Face model (ours keep the padding they were trained with).
    """
    directory = resolve_checkpoint_dir(path)
    config = checkpoint_model_config(directory) if directory.is_dir() else None
    if config is not None:
        model = build_model(config, runtime)
        if (directory / MODEL_FILE).is_file():
            load_weights(model, directory / MODEL_FILE)
        else:
            load_sharded_weights(model, directory)
    elif (directory / "config.json").is_file() or not directory.exists():
        source = directory if directory.exists() else str(path)
        config, state = read_hf_model(source, vocab_multiple)
        model = build_model(config, runtime)
        load_state_checked(model, state, str(source))
    elif directory.is_dir():
        raise UserError(
            f"{directory} is neither a gpt2forge checkpoint ({MODEL_FILE} with a model config, or {SHARDED_DIR}/ "
            f"with {MODEL_CONFIG_FILE}) nor a run directory "
            f"(with a '{LATEST}' file) nor a Hugging Face model directory (with config.json)"
        )
    else:
        raise UserError(f"{directory} is a file; pass the checkpoint directory that holds it")
    return model.to(device).eval()
