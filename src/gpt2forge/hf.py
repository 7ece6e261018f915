"""Hugging Face interop: read a ``GPT2LMHeadModel`` directory (or hub name) as our GPT-2's config and state dict,
and write our models out as Hugging Face directories (and read those back).

GPT-2 goes to ``transformers``' own ``GPT2LMHeadModel``, which computes exactly what ours does. The layouts
differ only in that Hugging Face stores the four projection matrices as ``Conv1D`` ([in, out]), where we use
``nn.Linear`` ([out, in]): those four are transposed, everything else maps by name.

``modern`` has no exact ``transformers`` counterpart (no class has its mix of half-rotary heads, gain-free QK
RMSNorm, ReLU², a soft cap, residual scalars and value embeddings), so it goes out as remote code:
``hf_remote/configuration_gpt2forge.py`` and ``hf_remote/modeling_gpt2forge.py`` (package data, self-contained)
are copied next to the weights and named in ``config.json``'s ``auto_map``;
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it.
The modeling file is driven by the modern config's fields (``FIELDS`` in the configuration file); a model with
a field it does not know is refused rather than exported to compute something else.

Every export carries the GPT-2 tokenizer files and a model card (README.md). Nothing here imports
``transformers``.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .files import as_if_opened, umask
from .models import ModelConfig, make_config, tied_weights
from .models.gpt2 import GPT, GPTConfig
from .tokenizer import EOT_TOKEN, get_tokenizer

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_HF_KEYS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in older checkpoints
GPT2_VOCAB = 50257
REMOTE_CODE = Path(__file__).parent / "hf_remote"
MODERN_TYPE = "gpt2forge_modern"
REMOTE_FILES = ("configuration_gpt2forge.py", "modeling_gpt2forge.py")
VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight", "lm_head.bias")  # cut to / padded from the real vocab
# ... and the value-embedding tables, transformer.ve.<i>.weight
REMOTE_OPTIONAL = {"logit_softcap_form": "tanh", "residual_scalars": False, "value_embeds": 0}
"""Remote-code fields an older export's config.json may lack, and what it computed without them."""


def vocab_rows(key: str) -> bool:
    """Whether the state-dict entry ``key`` has one row per (padded) vocabulary entry."""
    return key in VOCAB_ROWS or (key.startswith("transformer.ve.") and key.endswith(".weight"))


def remote_fields() -> tuple[str, ...]:
    """The modern config fields the shipped modeling file implements (its configuration file's ``FIELDS``)."""
    tree = ast.parse((REMOTE_CODE / REMOTE_FILES[0]).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "FIELDS")
    return tuple(ast.literal_eval(node.value))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def config_from_hf(hf: dict, origin: str, vocab_multiple: int = 1) -> ModelConfig:
    """Our config for a Hugging Face config.json (GPT-2, or our modern export), refusing other architectures."""
    if hf.get("model_type") == MODERN_TYPE:
        try:
            fields = {**REMOTE_OPTIONAL, **{f: hf[f] for f in remote_fields() if f in hf or f not in REMOTE_OPTIONAL}}
            return make_config("modern", **fields, vocab_multiple=vocab_multiple)
        except KeyError as e:
            raise UserError(f"{origin}: config.json lacks {e}") from None
        except ValueError as e:
            raise UserError(f"{origin}: {e}") from None
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{origin}: model_type is {hf.get('model_type')!r}, but only 'gpt2' models (and gpt2forge's "
                        f"own '{MODERN_TYPE}' exports) can be loaded")
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


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig, origin: str) -> dict[str, torch.Tensor]:
    """Rename/transpose Hugging Face GPT-2 weights into our module's state dict (padding the vocab if asked); our
    modern exports carry our names already, so only the vocabulary rows are padded and ties restored."""
    if config.arch != "gpt2":
        state = {k: v for k, v in hf_state.items() if k not in tied_weights(config)}
        for key in [k for k in state if vocab_rows(k)]:
            if config.padded_vocab_size > state[key].size(0):
                pad = state[key].new_zeros(config.padded_vocab_size - state[key].size(0), *state[key].shape[1:])
                state[key] = torch.cat([state[key], pad])
        for alias, source in tied_weights(config).items():
            if source in state:
                state[alias] = state[source]
        return state
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


def read_hf_model(name_or_path: str | os.PathLike, vocab_multiple: int | None = None) -> tuple[ModelConfig, dict]:
    """(our config, our state dict) of a Hugging Face GPT-2 (or one of our modern exports): a local directory, or a
    hub name when online.

    ``vocab_multiple`` pads the vocabulary (e.g. 128 to train on from OpenAI's weights; default: none).
    """
    directory = _local_or_download(name_or_path)
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json: not a Hugging Face model directory")
    config = config_from_hf(_read_json(directory / "config.json"), str(directory), vocab_multiple or 1)
    return config, state_dict_from_hf(_read_hf_weights(directory), config, str(directory))


def modern_hf_config(config: ModelConfig) -> dict:
    """The config.json of a modern model as remote code: its fields, and the ``auto_map`` naming the two files."""
    fields = remote_fields()
    unsupported = [f for f in config.field_names() if f not in fields and f != "vocab_multiple"]
    if unsupported:
        raise UserError(
            f"this model's config has {', '.join('model.' + f for f in unsupported)}, which the Hugging Face modeling "
            f"file ({REMOTE_CODE / REMOTE_FILES[1]}) does not implement; it implements {', '.join(fields)}. Export "
            "refuses rather than write a model that computes something else: add the field(s) to the modeling and "
            "configuration files (and their parity test, tests/test_export.py)"
        )
    module = {name: Path(name).stem for name in REMOTE_FILES}
    return {
        "architectures": ["Gpt2forgeModernForCausalLM"],
        "model_type": MODERN_TYPE,
        "auto_map": {"AutoConfig": f"{module[REMOTE_FILES[0]]}.Gpt2forgeModernConfig",
                     "AutoModelForCausalLM": f"{module[REMOTE_FILES[1]]}.Gpt2forgeModernForCausalLM"},
        **{f: getattr(config, f) for f in fields},
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "torch_dtype": "float32",
    }


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
    """Our weights under Hugging Face names and layout (GPT-2's Conv1D transposes; our names for modern), vocab
    padding sliced off, a tied head left to the tie."""
    vocab = model.config.vocab_size
    out = {}
    for key, value in model.state_dict().items():
        if key in tied_weights(model.config):
            continue
        value = value.detach().to("cpu", dtype)
        if vocab_rows(key):
            value = value[:vocab]
        if model.config.arch == "gpt2" and key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        out[key] = value.contiguous()
    return out


def export_hf(model, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
              vocab_dir: str | None = None, card: dict | None = None) -> Path:
    """Write ``model`` as a Hugging Face directory, atomically: weights, config, GPT-2 tokenizer files, a model card
    (``card``: what ``model_card`` reports), and for ``modern`` the remote code."""
    arch = model.config.arch
    if arch not in ("gpt2", "modern"):
        raise UserError(f"this model's architecture is {arch!r}: Hugging Face export writes gpt2 and modern only")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"export directory {out} exists and is not empty; choose a new one")
    config = hf_config(model.config) if arch == "gpt2" else modern_hf_config(model.config)
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
        if arch == "modern":
            for name in REMOTE_FILES:
                shutil.copyfile(REMOTE_CODE / name, tmp / name)
        (tmp / "README.md").write_text(model_card(model, config, card or {}))
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


def model_card(model, config: dict, card: dict) -> str:
    """README.md of an export: what the model is, how to load it, and (from ``card``) the recipe, the data, the
    steps trained and the scores measured."""
    c, remote = model.config, model.config.arch != "gpt2"
    load = ("AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)" if remote
            else "AutoModelForCausalLM.from_pretrained(path)")
    lines = [
        "---", "library_name: transformers", "tags: [gpt2forge, text-generation]", "---", "",
        f"# {card.get('name') or 'gpt2forge model'}", "",
        f"A `{c.arch}` model trained with gpt2forge: {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, context "
        f"{c.block_size}, GPT-2's {c.vocab_size:,}-token BPE vocabulary; {model.num_params():,} parameters.", "",
        ("Architecture: gpt2forge's `modern` (" + ", ".join(f"{f}={config[f]}" for f in remote_fields()[4:])
         + "). No `transformers` class computes it exactly, so it ships as remote code (`modeling_gpt2forge.py`, "
           "`configuration_gpt2forge.py`)." if remote else
         "Architecture: GPT-2 exactly, exported to `transformers`' own `GPT2LMHeadModel`."), "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"model = {load}", "tokenizer = AutoTokenizer.from_pretrained(path)", "```", "",
        "## Training", "",
        f"- Steps: {card.get('step', 'unknown')}" + (f" ({card['tokens']:,} tokens)" if card.get("tokens") else ""),
        f"- Data: {card.get('data', 'unknown')}",
        f"- Recipe: {card.get('recipe_name', 'unknown')}",
    ]
    if card.get("recipe"):
        lines += ["", "<details><summary>Resolved config</summary>", "", "```toml", card["recipe"].rstrip(), "```",
                  "", "</details>"]
    lines += ["", "## Scores", ""]
    scores = card.get("scores") or {}
    lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in scores.items()] or [
        "None measured yet: `gpt2forge eval --model CHECKPOINT --data DIR --tasks all` writes them."]
    return "\n".join(lines) + "\n"
