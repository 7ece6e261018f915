"""Hugging Face interop, a GPT-2 adapter: read a ``GPT2LMHeadModel`` directory (or hub name) as our GPT-2's
config and state dict, and write our GPT-2 out as one.

The layouts differ only in that Hugging Face stores the four projection matrices as ``Conv1D`` ([in, out]),
where we use ``nn.Linear`` ([out, in]): those four are transposed, everything else maps by name. Other
architectures of ours have no exact ``transformers`` counterpart and are refused with a message. Nothing here
imports ``transformers``; the exported directory loads with ``AutoModelForCausalLM`` and ``AutoTokenizer``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .files import as_if_opened, umask
from .models.gpt2 import GPT, GPTConfig
from .tokenizer import EOT_TOKEN, get_tokenizer

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_HF_KEYS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in older checkpoints
GPT2_VOCAB = 50257


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def config_from_hf(hf: dict, origin: str, vocab_multiple: int = 1) -> GPTConfig:
    """Our GPTConfig for a Hugging Face GPT-2 config.json, refusing architectures we do not implement."""
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{origin}: model_type is {hf.get('model_type')!r}, but only 'gpt2' models can be loaded")
    problems = []
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"activation_function={hf['activation_function']!r} (need gelu_new)")
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
        problems.append(f"n_inner={hf['n_inner']} (need 4·n_embd)")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        problems.append("scale_attn_by_inverse_layer_idx=true")
    if hf.get("scale_attn_weights") is False:
        problems.append("scale_attn_weights=false")
    if hf.get("tie_word_embeddings") is False:
        problems.append("tie_word_embeddings=false")
    if problems:
        raise UserError(f"{origin}: not a standard GPT-2 architecture: " + ", ".join(problems))
    try:
        return GPTConfig(
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            vocab_multiple=vocab_multiple,
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )
    except KeyError as e:
        raise UserError(f"{origin}: config.json lacks {e}") from None
    except ValueError as e:
        raise UserError(f"{origin}: {e}") from None


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        return load_file(directory / "model.safetensors")
    if index.is_file():
        state = {}
        for shard in sorted(set(_read_json(index)["weight_map"].values())):
            state.update(load_file(directory / shard))
        return state
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: GPTConfig, origin: str) -> dict[str, torch.Tensor]:
    """Rename/transpose Hugging Face GPT-2 weights into our module's state dict (padding the vocab if asked)."""
    state = {}
    for key, value in hf_state.items():
        if key.endswith(IGNORED_HF_KEYS) or key in GPT.tied_weights(config):
            continue  # restored from its source below
        if not key.startswith("transformer."):
            key = "transformer." + key  # checkpoints saved from GPT2Model have no prefix
        if key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        state[key] = value.contiguous()
    wte = state.get("transformer.wte.weight")
    if wte is None:
        raise UserError(f"{origin}: the weights have no transformer.wte.weight")
    if config.padded_vocab_size > wte.size(0):
        pad = wte.new_zeros(config.padded_vocab_size - wte.size(0), wte.size(1))
        state["transformer.wte.weight"] = torch.cat([wte, pad])
    for alias, source in GPT.tied_weights(config).items():
        state[alias] = state[source]
    return state


def _local_or_download(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} is a file; pass the directory that holds config.json and the weights")
        return path
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model directory {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        raise UserError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def read_hf_model(name_or_path: str | os.PathLike, vocab_multiple: int | None = None) -> tuple[GPTConfig, dict]:
    """(our GPT-2 config, our state dict) of a Hugging Face GPT-2: a local directory, or a hub name when online.

    ``vocab_multiple`` pads the vocabulary (e.g. 128 to train on from OpenAI's weights; default: none).
    """
    directory = _local_or_download(name_or_path)
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json: not a Hugging Face model directory")
    config = config_from_hf(_read_json(directory / "config.json"), str(directory), vocab_multiple or 1)
    return config, state_dict_from_hf(_read_hf_weights(directory), config, str(directory))


def refuse_other_architectures(model) -> None:
    if model.config.arch != "gpt2":
        raise UserError(
            f"this model's architecture is {model.config.arch!r}: Hugging Face export writes GPT-2 "
            "(GPT2LMHeadModel) only, and no transformers architecture matches this one exactly (rotary "
            "positions, RMSNorm, QK-norm, ReLU², soft-capped logits). Use our checkpoint directory as it is: "
            "`gpt2forge sample` and `gpt2forge eval` read it"
        )


def hf_config(config: GPTConfig) -> dict:
    """The config.json of a Hugging Face GPT2LMHeadModel with our shape (dropout off: we train without it)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "torch_dtype": "float32",
    }


def hf_state_dict(model, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face names and layout, vocab padding sliced off, lm_head left to the tie."""
    vocab = model.config.vocab_size
    out = {}
    for key, value in model.state_dict().items():
        if key in GPT.tied_weights(model.config):
            continue
        value = value.detach().to("cpu", dtype)
        if key == "transformer.wte.weight":
            value = value[:vocab]
        if key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        out[key] = value.contiguous()
    return out


def export_hf(model, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
              vocab_dir: str | None = None) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 directory (weights, config, GPT-2 tokenizer files), atomically."""
    refuse_other_architectures(model)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"export directory {out} exists and is not empty; choose a new one")
    config = hf_config(model.config)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(hf_state_dict(model, dtype), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if model.config.vocab_size == GPT2_VOCAB:
            _write_tokenizer(tmp, model.config.block_size, vocab_dir)
        # mkdtemp makes the directory 0700 and safetensors writes 0600 files: readable by their owner only, not by
        # colleagues on a shared filesystem. Give them what a plain mkdir and open would: 0777 / 0666 & ~umask.
        for path in tmp.iterdir():
            as_if_opened(path)
        os.chmod(tmp, 0o777 & ~umask())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_tokenizer(directory: Path, max_length: int, vocab_dir: str | None) -> None:
    encoder_json, vocab_bpe = get_tokenizer(vocab_dir).files.read()
    (directory / "vocab.json").write_bytes(encoder_json)
    (directory / "merges.txt").write_bytes(vocab_bpe)
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length,
                        "add_prefix_space": False, **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
