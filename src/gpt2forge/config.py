"""Typed run configuration: dataclasses with a docstring per field, TOML recipes, ``--section.key=value`` overrides.

A recipe is a TOML file whose tables are the sections below (``[model]``, ``[optim]``, …); anything it leaves
out keeps the default here. Command-line overrides are applied on top and everything is validated before any
work starts, so a typo fails in the first second with a message naming the key, not hours into a run.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import UserError
from .models import ARCHITECTURES, ModelConfig, architecture, make_config
from .models.common import ATTENTION_KINDS, LOSS_KINDS

RECIPES_DIR = Path(__file__).parent / "configs"  # shipped inside the package so named recipes work after any install


@dataclass
class DataSection:
    dir: str = "data/fineweb-edu-10B"
    """Directory of token shards (*_train_*.bin, *_val_*.bin) from `gpt2forge prepare` or llm.c."""
    shuffle: bool = True
    """Reshuffle shard order and sequence order every epoch (deterministically, from train.seed)."""


@dataclass
class OptimSection:
    optimizer: str = "adamw"
    """adamw: AdamW for every parameter (GPT-2's recipe); muon: Muon for the hidden matrices, AdamW for the
    embeddings, the head, gains and biases (the modern recipe)."""
    lr: float = 6e-4
    """Peak learning rate (AdamW's), reached after the warmup. The per-role LRs below default to it."""
    matrix_lr: float | None = None
    """Peak LR of the hidden matrices (Muon's LR when optimizer = muon); default: optim.lr."""
    embedding_lr: float | None = None
    """Peak LR of the token (and position) embeddings; default: optim.lr."""
    head_lr: float | None = None
    """Peak LR of an untied output head; default: optim.lr (a tied head is the token embedding)."""
    scalar_lr: float | None = None
    """Peak LR of gains and biases (1-D parameters); default: optim.lr."""
    lambda_lr: float | None = None
    """Peak LR of the learned mixing coefficients (model.residual_scalars' λr and λ0, the value-embedding gates);
    AdamW, never decayed; default: optim.scalar_lr."""
    value_embed_lr: float | None = None
    """Peak LR of the value-embedding tables (model.value_embeds); AdamW with optim.weight_decay; default:
    optim.embedding_lr."""
    schedule: str = "cosine"
    """cosine: warmup, cosine decay to min_lr at decay_steps, then flat. wsd: warmup, stable, then linear
    decay to min_lr over the last cooldown_fraction of train.max_steps. Every role follows the same shape."""
    warmup_steps: int = 715
    """Linear warmup steps from lr/warmup_steps to lr."""
    min_lr: float = 6e-5
    """The floor the schedule decays to (other roles decay to the same fraction of their peak)."""
    decay_steps: int | None = None
    """cosine: steps of the decay, counted from step 0 (default: train.max_steps)."""
    cooldown_fraction: float = 0.2
    """wsd: fraction of train.max_steps spent in the final linear decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay of ≥2-D parameters (matrices, embeddings, head); gains and biases: scalar_weight_decay."""
    scalar_weight_decay: float = 0.0
    """AdamW's weight decay of gains and biases (1-D parameters): 0 in GPT-2's recipe; track 3 decays them like its
    other AdamW groups (0.001)."""
    matrix_weight_decay: float | None = None
    """Weight decay of the hidden matrices (Muon's when optimizer = muon); default: optim.weight_decay."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.95
    """AdamW β2."""
    eps: float = 1e-8
    """AdamW ε."""
    fused: bool = True
    """Use the fused AdamW kernel where the device has one (CUDA and CPU: 4× faster optimizer steps on CPU)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this. 0 = no clipping and no norm computed: grad_norm is logged empty, the
    gradient-norm spike rule is off, and a non-finite gradient shows in the weights' check after the update (the
    run stops, nothing is saved)."""
    muon_momentum: float = 0.95
    """Muon's momentum after its warmup."""
    muon_momentum_start: float = 0.85
    """Muon's momentum at step 0, raised linearly to muon_momentum over muon_momentum_warmup_steps."""
    muon_momentum_warmup_steps: int = 300
    """Steps of Muon's momentum warmup (0 = muon_momentum from the start)."""
    muon_momentum_cooldown_steps: int = 0
    """Steps at the end of the run (the last N of train.max_steps) over which Muon's momentum falls linearly from
    muon_momentum back to muon_momentum_start, reaching it on the last step (0 = none; modded-nanogpt's current
    record: 50). A step in both the warmup and the cooldown takes the warmup's value."""
    muon_cautious_wd: bool = False
    """Cautious weight decay for Muon's matrices: decay only the entries where the update and the weight agree in
    sign (the update already pulls them toward 0), at matrix_weight_decay × lr_t × lr_t/lr (the decay follows the
    LR schedule twice, as modded-nanogpt's record #50: it fades out in the cooldown)."""
    muon_normuon: bool = False
    """NorMuon (Li et al. 2025, arXiv 2510.05491): divide each row (output neuron) of Muon's orthogonalised update by
    the root of an EMA of its mean square, then rescale the whole update to its former Frobenius norm."""
    muon_beta2: float = 0.95
    """NorMuon's EMA factor for the rows' mean squares."""
    muon_nesterov: bool = True
    """Nesterov momentum in Muon."""
    muon_ns: str = "jordan5"
    """Muon's Newton–Schulz iteration (optim/muon.py): jordan5 ((3.4445, −4.775, 2.0315) × 5: the Muon repository,
    track 1 until Polar Express), track3 ((2, −1.5, 0.5) × 12: track 3's train_gpt_simple.py, close to the exact
    polar factor) or polar_express (5 per-iteration triples: modded-nanogpt's current train_gpt.py)."""
    muon_ns_steps: int | None = None
    """Newton–Schulz iterations per Muon step; default: the variant's own (5, 12, 5; polar_express has no more)."""
    muon_ns_eps: float | None = None
    """The guard in Newton–Schulz's start M/(‖M‖_F + eps); default: the variant's (1e-7; polar_express 1e-6). Track
    3's 1e-7 is for its summed loss: on our mean loss its recipe divides it by the tokens per step, as Adam's eps."""

    def role_lr(self, role: str) -> float:
        """Peak LR of a parameter role (matrix, embedding, head, scalar, lambda, value_embed)."""
        value = getattr(self, f"{role}_lr")
        if value is None:
            return self.role_lr(ROLE_LR_DEFAULTS[role]) if role in ROLE_LR_DEFAULTS else self.lr
        return value


ROLE_LR_DEFAULTS = {"lambda": "scalar", "value_embed": "embedding"}  # a role whose unset LR is another role's


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
    attention: str = "sdpa"
    """sdpa (F.scaled_dot_product_attention: flash on GPUs) or manual (explicit masked softmax, for teaching).
    A runtime choice: it changes neither the weights nor what a checkpoint can resume."""
    loss: str = "chunked"
    """chunked (fp32 cross-entropy a chunk of rows at a time, padded columns masked: no full fp32 copy of the
    [B, T, V] logits) or reference (an fp32 copy and F.cross_entropy: build-nanogpt's numerics bit for bit).
    Equal to fp32 rounding; a runtime choice like attention."""
    distributed: str = "ddp"
    """ddp (replicate the model) or fsdp (shard parameters, gradients and optimizer state: the larger presets)."""
    max_bad_steps: int = 5
    """Stop the run after this many consecutive skipped steps (a non-finite loss or gradient norm, or a loss
    spike by any spike_* rule): each is skipped, its update never applied. While the latest step was skipped, or
    when the weights to be saved score a spike on the next batch, no checkpoint is written (it waits for a healthy
    step); a run that ends that way exits with an error naming its last healthy checkpoint."""
    spike_loss_margin: float = 5.0
    """Skip a step whose loss is above ln(vocab_size) + this many nats: a model that knows nothing scores
    ln(vocab_size) and a healthy run, from its first step, is never far above; an exploded update lands far above.
    Needs no history; 0 = off."""
    spike_jump: float = 4.0
    """Skip a step whose loss is more than this many times the previous applied step's (and more than 1 nat
    above it); from the second step; 0 = off."""
    spike_grad_ratio: float = 100.0
    """Skip a step whose gradient norm is more than this many times the median norm of the last spike_window
    applied steps; from the second step; not with optim.grad_clip = 0 (no norm is computed); 0 = off."""
    spike_zscore: float = 7.0
    """Skip a step whose loss is more than this many standard deviations above the mean loss of the last
    spike_window applied (not skipped) steps: llm.c's loss z-score guard; 0 = off."""
    spike_window: int = 128
    """How many recent applied steps' losses (and gradient norms) the spike guard keeps (in the checkpoint: the
    guard applies from the first step of a resumed launch)."""
    spike_min_history: int = 128
    """The z-score rule acts only once this many losses are in its window (the other rules need none)."""
    restart: bool = False
    """Start the run over from step 0 even though its directory has checkpoints: they (and metrics.csv) are
    moved to RUN_DIR/previous-<time>/, not deleted. For this launch only: the run's saved config says false."""
    reschedule: bool = False
    """On resume, adopt LR-schedule settings that differ from the run's own (train.max_steps where the schedule
    follows it, optim.lr, min_lr, warmup_steps, decay_steps, schedule, cooldown_fraction, role LRs); without it
    such a resume is refused. For this launch only: the run's saved config says false."""


@dataclass
class EvalSection:
    val_every: int = 250
    """Validation loss every N steps and at the end (0 = never)."""
    val_tokens: int = 10485760
    """Validation tokens per evaluation: the first val_tokens // seq_len sequences of the val split, the same set on
    any number of GPUs (0 = the whole split). 10,485,760 is what llm.c, build-nanogpt and modded-nanogpt score."""
    hellaswag_every: int = 250
    """HellaSwag accuracy every N steps and at the end (0 = never)."""
    hellaswag_file: str = ""
    """Local HellaSwag validation jsonl; empty = download from its public URL (cached)."""
    hellaswag_limit: int = 0
    """Score only the first N HellaSwag examples (0 = all 10,042)."""
    tasks_every: int = 0
    """The downstream suite (eval.tasks: accuracy, centered accuracy, their CORE-style mean) every N steps and at
    the end (0 = never)."""
    tasks: str = "all"
    """Downstream tasks for tasks_every, comma-separated (hellaswag, arc_easy, arc_challenge, piqa, winogrande,
    copa, commonsense_qa, openbookqa, sciq, siqa, boolq, lambada) or all."""
    tasks_dir: str = ""
    """Local task data (DIR/TASK.jsonl|parquet|arrow or DIR/TASK/ in the hub's layout); empty = the hub (cached)."""
    tasks_limit: int = 0
    """Score only the first N rows of each task (0 = all)."""
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
    format: str = "auto"
    """full (the whole model and optimizer state gathered to rank 0 and written there, synchronously:
    model.safetensors + optimizer.pt), sharded (every rank writes its own shards with torch.distributed.checkpoint,
    in the background while training goes on; resumable on any number of ranks; eval/sample/export read it too), or
    auto: sharded with train.distributed = fsdp on several ranks, full otherwise. Any run resumes from either."""


@dataclass
class LogSection:
    out_dir: str = "out"
    """Parent directory of run directories."""
    run_name: str = ""
    """Run directory name under out_dir (default: the recipe's name)."""
    every: int = 1
    """Console/CSV line every N steps."""
    trackers: str = ""
    """Experiment trackers that mirror metrics.csv, comma-separated (accelerate's integrations): tensorboard
    (into RUN_DIR/tensorboard), wandb, mlflow, comet_ml, aim, clearml, dvclive (RUN_DIR/dvclive), swanlab,
    trackio. Each needs its package: pip install NAME (tensorboard and wandb: pip install 'gpt2forge[log]').
    The old switches log.tensorboard=true and log.wandb=true still work: they add their tracker here."""
    project: str = "gpt2forge"
    """Project the trackers file the run under (W&B, Comet, SwanLab, trackio; MLflow's experiment); the run is
    named after its directory."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=make_config)
    """The architecture's own config (models/): ``arch`` picks it, ``preset`` fills the size, fields override."""
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    name: str = ""
    """The recipe's name (its file stem); the default run name."""

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model.to_dict(),
                **{s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS if s != "model"}}


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "name")


def _section_types(section: str) -> dict[str, type]:
    cls = {f.name: f for f in dataclasses.fields(Config)}[section].default_factory
    return typing.get_type_hints(cls)


def _coerce(value, from_text: bool = False, *, hint, key: str):
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


# Keys that moved, still read from older recipes and saved run configs: old (section, key) -> new.
MOVED = {("model", "attention"): ("train", "attention"), ("log", "wandb_project"): ("log", "project")}
# Old on/off switches of one tracker each, still read: true adds the tracker to log.trackers, false does nothing.
TRACKER_SWITCHES = {("log", "tensorboard"): "tensorboard", ("log", "wandb"): "wandb"}
# accelerate's tracker names (accelerate.tracking.LOGGER_TYPE_TO_CLASS; a test keeps the two in step).
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
MODEL_CHOICE_KEYS = ("arch", "preset")  # how the [model] table is read, besides the architecture's own fields


class _Loader:
    """Applies TOML tables and overrides to a Config. ``[model]`` entries are collected and built last, because
    which fields exist (and their types) depends on ``model.arch``, which may come from any of the sources."""

    def __init__(self) -> None:
        self.config = Config()
        self.model: dict[str, tuple[object, bool, str]] = {}  # key -> (value, from_text, where it came from)
        self.origin = ""  # the recipe being read, named in errors

    def apply(self, section: str, key: str, value, from_text: bool) -> None:
        section, key = MOVED.get((section, key), (section, key))
        if section not in SECTIONS:
            raise UserError(f"unknown config section {section!r} (in {section}.{key}); sections: {', '.join(SECTIONS)}")
        if section == "model":
            self.model[key] = (value, from_text, "" if from_text else self.origin)
            return
        if (section, key) in TRACKER_SWITCHES:
            if _coerce(value, from_text, hint=bool, key=f"{section}.{key}"):
                names = tracker_names(self.config.log.trackers, check=False)
                self.config.log.trackers = ",".join(dict.fromkeys([*names, TRACKER_SWITCHES[section, key]]))
            return
        hints = _section_types(section)
        if key not in hints:
            raise UserError(f"unknown config key {section}.{key}; {section} has: {', '.join(hints)}")
        setattr(getattr(self.config, section), key, _coerce(value, from_text, hint=hints[key], key=f"{section}.{key}"))

    def build_model(self) -> None:
        """The architecture's config from the collected ``[model]`` entries (arch, preset, then fields)."""
        def coerce(key: str, hint) -> object:
            value, from_text, origin = self.model[key]
            try:
                return _coerce(value, from_text, hint=hint, key=f"model.{key}")
            except UserError as e:
                raise UserError(f"{origin}: {e}" if origin else str(e)) from None

        choice = {k: coerce(k, str) if k in self.model else None for k in MODEL_CHOICE_KEYS}
        arch = choice["arch"] or "gpt2"
        try:
            types_ = architecture(arch).field_types()
        except ValueError as e:
            raise UserError(str(e)) from None
        fields = {}
        for key in self.model:
            if key in MODEL_CHOICE_KEYS:
                continue
            if key not in types_:
                origin = self.model[key][2]
                raise UserError(f"{origin + ': ' if origin else ''}unknown config key model.{key} for arch {arch}; "
                                f"model has: {', '.join([*MODEL_CHOICE_KEYS, *types_])}")
            fields[key] = coerce(key, types_[key])
        try:
            self.config.model = make_config(arch, choice["preset"], **fields)
        except ValueError as e:
            raise UserError(str(e)) from None


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
    loader = _Loader()
    if recipe is not None:
        path = resolve_recipe(recipe)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: invalid TOML: {e}") from None
        except OSError as e:
            raise UserError(f"cannot read recipe {path}: {e.strerror}") from None
        # A recipe is named by its file; a config written by to_toml (a run's config.toml, --print-config) names
        # itself, also when its name is empty (a run without a recipe), so that it reads back the same.
        name = data.pop("name", path.stem)
        if not isinstance(name, str):
            raise UserError(f"{path}: top-level name must be a string, got {name!r}")
        loader.config.name = name
        loader.origin = str(path)
        try:
            for section, values in data.items():
                if not isinstance(values, dict):
                    raise UserError(f"top-level key {section!r} must be a table like [{section}]")
                for key, value in values.items():
                    loader.apply(section, key, value, from_text=False)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    for item in _pair_overrides(list(overrides)):
        dotted, sep, value = item.partition("=")
        section, dot, key = dotted.removeprefix("--").partition(".")
        if not sep or not dot:
            raise UserError(f"override {item!r} must look like --section.key=value (e.g. --optim.lr=3e-4)")
        loader.apply(section, key, value, from_text=True)
    loader.build_model()
    validate(loader.config)
    tracker_names(loader.config.log.trackers)
    return loader.config


def tracker_names(trackers: str, check: bool = True) -> list[str]:
    """The names in a ``log.trackers`` value (comma-separated, blanks ignored), refusing unknown ones."""
    names = list(dict.fromkeys(n.strip().lower() for n in trackers.split(",") if n.strip()))
    unknown = [n for n in names if n not in TRACKERS]
    if check and unknown:
        raise UserError(f"log.trackers: unknown tracker(s) {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")
    return names


def _pair_overrides(items: list[str]) -> list[str]:
    """Accept both ``--optim.lr=3e-4`` and ``--optim.lr 3e-4``."""
    paired = []
    while items:
        item = items.pop(0)
        if "=" not in item and items and not items[0].startswith("--"):
            item = f"{item}={items.pop(0)}"
        paired.append(item)
    return paired


CHOICES = {
    "optim.optimizer": ("adamw", "muon"),
    "optim.schedule": ("cosine", "wsd"),
    "optim.muon_ns": ("jordan5", "track3", "polar_express"),  # optim/muon.py's NS_VARIANTS (a test keeps them equal)
    "train.precision": ("auto", "bf16", "fp32"),
    "train.distributed": ("ddp", "fsdp"),
    "checkpoint.format": ("auto", "full", "sharded"),
    "train.attention": ATTENTION_KINDS,
    "train.loss": LOSS_KINDS,
}
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _values(config: Config) -> dict[str, object]:
    """Every setting by its dotted key."""
    flat = {f"model.{k}": v for k, v in config.model.to_dict().items()}
    for section in SECTIONS:
        if section != "model":
            flat.update({f"{section}.{k}": v for k, v in dataclasses.asdict(getattr(config, section)).items()})
    return flat


def validate(config: Config) -> None:
    """Check values that are wrong whatever the hardware (batch arithmetic needing the world size is checked at
    launch, see ``grad_accum_steps``). A NaN or infinite number is refused anywhere: one would train for hours
    and end with a NaN model."""
    m, t, o, e = config.model, config.train, config.optim, config.eval
    values = _values(config)
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key} must be a finite number, got {value}")
    for key, allowed in CHOICES.items():
        if values[key] not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}, got {values[key]!r}")
    positive = ["train.max_steps", "train.total_batch_tokens", "train.micro_batch_size", "train.seq_len", "optim.lr",
                "optim.eps", "checkpoint.keep_last", "log.every", "train.max_bad_steps", "optim.muon_ns_steps",
                "optim.matrix_lr", "optim.embedding_lr", "optim.head_lr", "optim.scalar_lr", "optim.decay_steps",
                "optim.lambda_lr", "optim.value_embed_lr",
                "train.spike_window", "optim.muon_ns_eps"]
    for key in positive:
        if values[key] is not None and values[key] <= 0:
            raise UserError(f"{key} must be positive, got {values[key]}")
    non_negative = ["optim.min_lr", "optim.warmup_steps", "optim.weight_decay", "optim.matrix_weight_decay",
                    "optim.scalar_weight_decay",
                    "optim.grad_clip", "optim.muon_momentum_warmup_steps", "optim.muon_momentum_cooldown_steps",
                    "eval.val_every", "eval.val_tokens",
                    "eval.hellaswag_every", "eval.hellaswag_limit", "eval.tasks_every", "eval.tasks_limit",
                    "eval.sample_every", "eval.sample_tokens", "eval.num_samples", "checkpoint.every",
                    "train.spike_zscore", "train.spike_loss_margin", "train.spike_jump", "train.spike_grad_ratio"]
    for key in non_negative:
        if values[key] is not None and values[key] < 0:
            raise UserError(f"{key} must be ≥ 0, got {values[key]}")
    unit = {"optim.beta1": o.beta1, "optim.beta2": o.beta2, "optim.muon_momentum": o.muon_momentum,
            "optim.muon_momentum_start": o.muon_momentum_start, "optim.muon_beta2": o.muon_beta2}
    for key, value in unit.items():
        if not 0 <= value < 1:
            raise UserError(f"{key} must be in [0, 1), got {value}")
    if not 0 < o.cooldown_fraction <= 1:
        raise UserError(f"optim.cooldown_fraction must be in (0, 1], got {o.cooldown_fraction}")
    if o.muon_ns == "polar_express" and (o.muon_ns_steps or 5) > 5:
        raise UserError(f"optim.muon_ns_steps ({o.muon_ns_steps}) must be at most 5 with optim.muon_ns=polar_express: "
                        "it has 5 per-iteration coefficient triples")
    if o.min_lr > o.lr:
        raise UserError(f"optim.min_lr ({o.min_lr}) is larger than optim.lr ({o.lr})")
    if t.seq_len > m.block_size:
        raise UserError(f"train.seq_len ({t.seq_len}) exceeds the model's context length "
                        f"(model.block_size = {m.block_size})")
    if not DEVICE.match(t.device):
        raise UserError(f"train.device must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}")
    if not 2 <= t.spike_min_history <= t.spike_window:
        raise UserError(f"train.spike_min_history must be between 2 and train.spike_window ({t.spike_window}), "
                        f"got {t.spike_min_history}")
    if e.sample_every and (e.sample_tokens == 0 or e.num_samples == 0):
        raise UserError("eval.sample_tokens and eval.num_samples must be positive when eval.sample_every is set")


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
    """The resolved config as TOML, readable back by ``load_config`` to the same config (None values are left
    out: they mean 'the default')."""
    data = {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v)
            for k, v in config.to_dict().items()}
    return toml_text(data)


# What TOML's basic strings must escape: quote, backslash and the control characters other than tab.
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_ESCAPE = re.compile('["\\\\\x00-\x08\x0a-\x1f\x7f]')
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)  # Python's float text (1e-05, inf, nan) is TOML's
    if isinstance(value, str):
        return '"' + _ESCAPE.sub(lambda m: _ESCAPES.get(m[0], f"\\u{ord(m[0]):04x}"), value) + '"'
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a TOML scalar")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_scalar(key)


def toml_text(data: dict) -> str:
    """A config-shaped dict (scalars, and tables of scalars) as TOML, laid out as ``tomli_w.dumps`` lays it out.

    Our own few lines rather than a dependency: a machine without ``tomli-w`` (the lent GPU machines) must still
    write a run's config.toml; ``tests/test_config.py`` checks the text against ``tomli_w`` and ``tomllib``."""
    scalars = [f"{_toml_key(k)} = {_toml_scalar(v)}\n" for k, v in data.items() if not isinstance(v, dict)]
    tables = ["".join([f"[{_toml_key(name)}]\n", *(f"{_toml_key(k)} = {_toml_scalar(v)}\n" for k, v in table.items())])
              for name, table in data.items() if isinstance(table, dict)]
    return "\n".join((["".join(scalars)] if scalars else []) + tables)


# ---------------------------------------------------------------- help: every setting with its type, default, doc


SECTION_SUMMARIES = {
    "data": "the token shards to train on",
    "optim": "optimizer, learning rates and their schedule",
    "train": "steps, batch, device, precision and the speed switches",
    "eval": "what the training loop evaluates, and how often: validation loss, HellaSwag, samples",
    "checkpoint": "how often to save, how many to keep, in which format",
    "log": "where the run directory goes, and the experiment trackers that mirror metrics.csv",
}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass, its base classes' fields included: the string literal written right
    after each field. Docstrings are not runtime attributes, so they are read from the source, once."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's docstring wins
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (a frozen app, a class made at runtime)
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    names = {f.name for f in dataclasses.fields(cls)}
    return {name: doc for name, doc in docs.items() if name in names}


def _type_name(hint) -> str:
    optional = isinstance(hint, types.UnionType) and type(None) in hint.__args__
    base = next(a for a in hint.__args__ if a is not type(None)) if optional else hint
    return base.__name__.upper() + (" (or none)" if optional else "")


def _default_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def _setting_help(key: str, metavar: str, default, doc: str, width: int) -> list[str]:
    head = f"  --{key} {metavar}"
    head = f"{head:<44} " if len(head) < 44 else f"{head}  "
    head += f"default: {_default_text(default)}"
    return [head, *textwrap.wrap(doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)]


def _section_help(section: str, cls: type, instance, width: int, metavar: dict[str, str] | None = None) -> list[str]:
    hints, docs, lines = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        key = f"{section}.{f.name}"
        choices = CHOICES.get(key)
        shown = (metavar or {}).get(f.name) or ("{" + ",".join(choices) + "}" if choices else _type_name(hints[f.name]))
        lines += _setting_help(key, shown, getattr(instance, f.name), docs.get(f.name, ""), width)
    return lines


def config_help(width: int = 100) -> str:
    """Every ``--section.key`` a run config has, grouped by section, with its type, default and docstring. The
    ``[model]`` table lists the default architecture's fields and, from the registry, the other architectures,
    their presets and the fields only they have."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    default_arch = architecture("gpt2")
    model = make_config(default_arch.name)
    lines = [
        *textwrap.wrap("config settings: any of them as --section.key=value (or --section.key value) on the command "
                       "line, or as `key = value` under `[section]` in a --config TOML file; --print-config shows the "
                       "resolved config.", width),
        "",
        *textwrap.wrap("[model]  the architecture's own config: model.arch picks it, model.preset sets its size, "
                       "the fields override it", width, subsequent_indent="         "),
    ]
    arches = ", ".join(f"{a.name}{' (default)' if a is default_arch else ''}: {a.summary}"
                       for a in ARCHITECTURES.values())
    lines += _setting_help("model.arch", "{" + ",".join(ARCHITECTURES) + "}", default_arch.name,
                           f"Architecture: {arches}.", width)
    presets = "; ".join(f"{a.name}: {', '.join(a.presets)} (default {a.default_preset})"
                        for a in ARCHITECTURES.values())
    lines += _setting_help("model.preset", "NAME", default_arch.default_preset,
                           f"Size preset of the architecture, applied before the fields below: {presets}.", width)
    lines.append(f"  fields of arch {default_arch.name} (defaults: preset {default_arch.default_preset}):")
    lines += _section_help("model", type(model), model, width)
    for arch in ARCHITECTURES.values():
        if arch is default_arch:
            continue
        shared = default_arch.config_class.field_names()
        own = [f for f in dataclasses.fields(arch.config_class) if f.name not in shared]
        if not own:
            continue
        other = make_config(arch.name)
        hints, docs = typing.get_type_hints(arch.config_class), field_docs(arch.config_class)
        lines += textwrap.wrap(f"fields only arch {arch.name} has (--model.arch={arch.name}; defaults: preset "
                               f"{arch.default_preset}):", width, initial_indent="  ", subsequent_indent="    ")
        for f in own:
            lines += _setting_help(f"model.{f.name}", _type_name(hints[f.name]), getattr(other, f.name),
                                   docs.get(f.name, ""), width)
    for name in SECTIONS:
        if name == "model":
            continue
        cls = sections[name].default_factory
        lines += ["", *textwrap.wrap(f"[{name}]  {SECTION_SUMMARIES[name]}", width, subsequent_indent=" " * 4)]
        lines += _section_help(name, cls, cls(), width)
    return "\n".join(lines)
