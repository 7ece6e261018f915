"""Typed run configuration: dataclasses with a docstring per field, TOML recipes, ``--section.key=value`` overrides.

A recipe is a TOML file whose tables are the sections below (``[model]``, ``[optim]``, …); anything it leaves
out keeps the default here. Command-line overrides are applied on top and everything is validated before any
work starts, so a typo fails in the first second with a message naming the key, not hours into a run.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import UserError
from .model import ATTENTION_KINDS, PRESETS, GPTConfig, preset_config

RECIPES_DIR = Path(__file__).parent / "configs"  # shipped inside the package so named recipes work after any install


@dataclass
class ModelSection:
    preset: str = "gpt2"
    """Architecture preset: tiny, gpt2 (124M), gpt2-medium, gpt2-large, gpt2-xl."""
    n_layer: int | None = None
    """Override the preset's number of layers."""
    n_head: int | None = None
    """Override the preset's number of attention heads."""
    n_embd: int | None = None
    """Override the preset's width."""
    block_size: int | None = None
    """Override the preset's context length (number of learned positions)."""
    vocab_size: int = 50257
    """Real vocabulary size: GPT-2's 50,257. Smaller only for tests with synthetic token ids (sampling,
    HellaSwag and Hugging Face export assume GPT-2's tokenizer)."""
    vocab_multiple: int = 128
    """Pad the embedding rows to a multiple of this (128: 50257 → 50304, faster matmuls); 1 = no padding."""
    attention: str = "sdpa"
    """sdpa (F.scaled_dot_product_attention: flash on GPU) or manual (explicit masked softmax, for teaching)."""

    def gpt_config(self) -> GPTConfig:
        overrides = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(self, k) is not None}
        return preset_config(self.preset, vocab_size=self.vocab_size, vocab_multiple=self.vocab_multiple,
                             attention=self.attention, **overrides)


@dataclass
class DataSection:
    dir: str = "data/fineweb-edu-10B"
    """Directory of token shards (*_train_*.bin, *_val_*.bin) from `gpt2forge prepare` or llm.c."""
    shuffle: bool = True
    """Reshuffle shard order and sequence order every epoch (deterministically, from train.seed)."""


@dataclass
class OptimSection:
    lr: float = 6e-4
    """Peak learning rate, reached after the warmup."""
    min_lr: float = 6e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 715
    """Linear warmup steps from lr/warmup_steps to lr."""
    decay_steps: int | None = None
    """Steps of the cosine decay, counted from step 0 (default: train.max_steps)."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to ≥2-D parameters only (matmuls, embeddings), never to biases or norms."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2."""
    eps: float = 1e-8
    """AdamW ε."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping; the norm is still logged)."""
    fused: bool = True
    """Use the fused AdamW kernel where the device has one (CUDA and CPU: 4× faster optimizer steps on CPU)."""


@dataclass
class TrainSection:
    max_steps: int = 19073
    """Optimizer steps of the whole run."""
    total_batch_tokens: int = 524288
    """Tokens per optimizer step across all ranks; gradient accumulation makes up the difference."""
    micro_batch_size: int = 64
    """Sequences per forward/backward on each rank."""
    seq_len: int = 1024
    """Tokens per sequence (at most the model's context length)."""
    seed: int = 1337
    """Seed of the model init, the data order and sampling."""
    device: str = "auto"
    """auto (CUDA, else MPS, else CPU), cpu, cuda."""
    precision: str = "auto"
    """bf16 (autocast), fp32, or auto: bf16 on GPUs that support it, fp32 elsewhere."""
    compile: bool = True
    """torch.compile the model for training, validation and HellaSwag (KV-cached sampling stays eager: its shapes
    change every token)."""
    tf32: bool = True
    """Allow TF32 matmuls on Ampere+ GPUs (fp32 runs and the fp32 parts of bf16 runs)."""
    distributed: str = "ddp"
    """ddp (replicate the model) or fsdp (shard parameters, gradients and optimizer state: the larger presets)."""
    max_bad_steps: int = 5
    """Stop the run after this many consecutive steps with a non-finite loss or gradient norm (each is skipped)."""


@dataclass
class EvalSection:
    val_every: int = 250
    """Validation loss every N steps and at the end (0 = never)."""
    val_tokens: int = 1310720
    """Validation tokens per evaluation across all ranks (20 batches of 64×1024), 0 = the whole val split."""
    hellaswag_every: int = 250
    """HellaSwag accuracy every N steps and at the end (0 = never)."""
    hellaswag_file: str = ""
    """Local HellaSwag validation jsonl; empty = download from its public URL (cached)."""
    hellaswag_limit: int = 0
    """Score only the first N HellaSwag examples (0 = all 10,042)."""
    sample_every: int = 250
    """Print samples every N steps and at the end (0 = never)."""
    sample_prompt: str = "Hello, I'm a language model,"
    """Prompt of the samples."""
    sample_tokens: int = 32
    """New tokens per sample."""
    num_samples: int = 4
    """Samples per sampling round."""


@dataclass
class CheckpointSection:
    every: int = 1000
    """Save a checkpoint every N steps (0 = only at the end and on SIGTERM/SIGINT)."""
    keep_last: int = 3
    """Keep the newest K checkpoints; older ones are deleted once a newer one is complete."""


@dataclass
class LogSection:
    out_dir: str = "out"
    """Parent directory of run directories."""
    run_name: str = ""
    """Run directory name under out_dir (default: the recipe's name)."""
    every: int = 1
    """Console/CSV line every N steps."""
    tensorboard: bool = False
    """Also log to TensorBoard (RUN_DIR/tensorboard; pip install 'gpt2forge[log]')."""
    wandb: bool = False
    """Also log to Weights & Biases (pip install 'gpt2forge[log]')."""
    wandb_project: str = "gpt2forge"
    """W&B project name."""


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    name: str = ""
    """The recipe's name (its file stem); the default run name."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "name")


def _section_types(section: str) -> dict[str, type]:
    cls = {f.name: f for f in dataclasses.fields(Config)}[section].default_factory
    return typing.get_type_hints(cls)


def _coerce(value, hint, key: str, from_text: bool):
    """``value`` as the field's type; text from the command line is parsed, TOML values are type-checked."""
    optional = isinstance(hint, types.UnionType) and type(None) in hint.__args__
    base = next(a for a in hint.__args__ if a is not type(None)) if optional else hint
    if from_text:
        text = str(value).strip()
        if optional and text.lower() in ("none", "null", ""):
            return None
        try:
            if base is bool:
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            if base is int:
                try:
                    return int(text)
                except ValueError:
                    number = float(text)  # also accept 5e5
                    if not number.is_integer():
                        raise
                    return int(number)
            return base(text)
        except ValueError:
            raise UserError(f"{key}: cannot read {value!r} as {base.__name__}") from None
    if value is None and optional:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not base:
        raise UserError(f"{key}: expected {base.__name__}, got {type(value).__name__} {value!r}")
    return value


def _apply(config: Config, section: str, key: str, value, from_text: bool) -> None:
    if section not in SECTIONS:
        raise UserError(f"unknown config section {section!r} (in {section}.{key}); sections: {', '.join(SECTIONS)}")
    hints = _section_types(section)
    if key not in hints:
        raise UserError(f"unknown config key {section}.{key}; {section} has: {', '.join(hints)}")
    setattr(getattr(config, section), key, _coerce(value, hints[key], f"{section}.{key}", from_text))


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe path: an existing file, or the name of a shipped recipe (``quickstart``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
    raise UserError(f"no recipe {name_or_path!r}: not a file, and not a shipped recipe ({names})")


def load_config(recipe: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults ← recipe TOML ← ``section.key=value`` overrides, then validated."""
    config = Config()
    if recipe is not None:
        path = resolve_recipe(recipe)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: invalid TOML: {e}") from None
        name = data.pop("name", path.stem)  # a run's saved config.toml names its run; a recipe is named by its file
        if not isinstance(name, str):
            raise UserError(f"{path}: top-level name must be a string, got {name!r}")
        config.name = name or path.stem
        for section, values in data.items():
            if not isinstance(values, dict):
                raise UserError(f"{path}: top-level key {section!r} must be a table like [{section}]")
            for key, value in values.items():
                try:
                    _apply(config, section, key, value, from_text=False)
                except UserError as e:
                    raise UserError(f"{path}: {e}") from None
    for item in _pair_overrides(list(overrides)):
        dotted, sep, value = item.partition("=")
        section, dot, key = dotted.removeprefix("--").partition(".")
        if not sep or not dot:
            raise UserError(f"override {item!r} must look like --section.key=value (e.g. --optim.lr=3e-4)")
        _apply(config, section, key, value, from_text=True)
    validate(config)
    return config


def _pair_overrides(items: list[str]) -> list[str]:
    """Accept both ``--optim.lr=3e-4`` and ``--optim.lr 3e-4``."""
    paired = []
    while items:
        item = items.pop(0)
        if "=" not in item and items and not items[0].startswith("--"):
            item = f"{item}={items.pop(0)}"
        paired.append(item)
    return paired


def validate(config: Config) -> None:
    """Check values that are wrong whatever the hardware (batch arithmetic needing the world size is checked at
    launch, see ``grad_accum_steps``)."""
    m, t, o, e, c = config.model, config.train, config.optim, config.eval, config.checkpoint
    if m.preset not in PRESETS:
        raise UserError(f"model.preset {m.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    if m.attention not in ATTENTION_KINDS:
        raise UserError(f"model.attention must be one of {ATTENTION_KINDS}, got {m.attention!r}")
    try:
        gpt = m.gpt_config()
    except ValueError as err:
        raise UserError(str(err)) from None
    positive = {
        "train.max_steps": t.max_steps, "train.total_batch_tokens": t.total_batch_tokens,
        "train.micro_batch_size": t.micro_batch_size, "train.seq_len": t.seq_len, "optim.lr": o.lr,
        "checkpoint.keep_last": c.keep_last, "log.every": config.log.every, "train.max_bad_steps": t.max_bad_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{key} must be positive, got {value}")
    non_negative = {
        "optim.min_lr": o.min_lr, "optim.warmup_steps": o.warmup_steps, "optim.weight_decay": o.weight_decay,
        "optim.grad_clip": o.grad_clip, "eval.val_every": e.val_every, "eval.val_tokens": e.val_tokens,
        "eval.hellaswag_every": e.hellaswag_every, "eval.hellaswag_limit": e.hellaswag_limit,
        "eval.sample_every": e.sample_every, "checkpoint.every": c.every,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise UserError(f"{key} must be ≥ 0, got {value}")
    if t.seq_len > gpt.block_size:
        raise UserError(f"train.seq_len ({t.seq_len}) exceeds the model's context length ({gpt.block_size})")
    if o.min_lr > o.lr:
        raise UserError(f"optim.min_lr ({o.min_lr}) is larger than optim.lr ({o.lr})")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        raise UserError("optim.beta1 and optim.beta2 must be in [0, 1)")
    choices = {"train.precision": (t.precision, ("auto", "bf16", "fp32")), "train.distributed": (t.distributed, ("ddp", "fsdp"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def grad_accum_steps(config: Config, world_size: int) -> int:
    """Micro-steps per optimizer step, or a UserError when the total batch does not split evenly."""
    t = config.train
    per_micro = t.micro_batch_size * t.seq_len * world_size
    if t.total_batch_tokens % per_micro:
        lower = max(per_micro, t.total_batch_tokens // per_micro * per_micro)
        raise UserError(
            f"train.total_batch_tokens ({t.total_batch_tokens:,}) must be divisible by micro_batch_size × seq_len × "
            f"world size = {t.micro_batch_size} × {t.seq_len} × {world_size} = {per_micro:,}; "
            f"try --train.total_batch_tokens={lower} or another micro batch size"
        )
    return t.total_batch_tokens // per_micro


def to_toml(config: Config) -> str:
    """The resolved config as TOML (None values are left out: they mean 'the default')."""
    lines = [f'name = "{config.name}"', ""]
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(config, section)).items():
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)
