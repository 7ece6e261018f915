import dataclasses

import pytest

from gpt2forge.commands import main
from gpt2forge.config import (
    RECIPES_DIR,
    SECTIONS,
    TRACKERS,
    Config,
    config_help,
    field_docs,
    grad_accum_steps,
    load_config,
    to_toml,
)
from gpt2forge.errors import UserError
from gpt2forge.models import ARCHITECTURES


def test_every_shipped_recipe_loads_and_round_trips(tmp_path):
    recipes = sorted(RECIPES_DIR.glob("*.toml"))
    assert {p.stem for p in recipes} >= {"quickstart", "gpt2-124m-fineweb-edu-10b"}
    for path in recipes:
        config = load_config(path.stem)
        assert config.name == path.stem
        saved = tmp_path / "config.toml"  # what a run directory keeps: usable again as --config
        saved.write_text(to_toml(config))
        assert load_config(str(saved)) == config
        grad_accum_steps(config, 1)  # and the batch arithmetic works on one process


def test_reference_recipe_is_the_reference_run():
    c = load_config("gpt2-124m-fineweb-edu-10b")  # REFERENCE.md
    assert (c.train.total_batch_tokens, c.train.max_steps, c.train.seq_len) == (524288, 19073, 1024)
    assert (c.optim.lr, c.optim.min_lr, c.optim.warmup_steps, c.optim.weight_decay) == (6e-4, 6e-5, 715, 0.1)
    assert (c.optim.beta1, c.optim.beta2, c.optim.eps, c.optim.grad_clip) == (0.9, 0.95, 1e-8, 1.0)
    assert (c.model.arch, c.model.n_layer, c.model.n_embd) == ("gpt2", 12, 768) and c.model.padded_vocab_size == 50304
    assert grad_accum_steps(c, 1) == 8 and grad_accum_steps(c, 8) == 1
    assert c.eval.val_every == c.eval.hellaswag_every == c.eval.sample_every == 250
    assert c.data.shuffle is False  # build-nanogpt read the shards in order
    assert c.eval.val_tokens == 20 * 8 * 64 * 1024  # the reference numbers' val tokens: the first 10,485,760
    assert c.train.loss == "reference"  # build-nanogpt's fp32 cross-entropy, bit for bit


def test_dotted_overrides_are_typed():
    c = load_config("quickstart",
                    ["--optim.lr=1e-3", "--train.max_steps", "5e3", "--train.compile=true", "--model.n_layer=3"])
    assert c.optim.lr == 1e-3 and c.train.max_steps == 5000 and c.train.compile is True and c.model.n_layer == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("--optim.learning_rate=1", "unknown config key optim.learning_rate; optim has: optimizer, lr, matrix_lr"),
        ("--optimizer.lr=1", "unknown config section 'optimizer'"),
        ("--train.max_steps=ten", "train.max_steps: cannot read 'ten' as int"),
        ("--train.compile=maybe", "train.compile: cannot read 'maybe' as bool"),
        ("--train.max_steps=1.5", "cannot read '1.5' as int"),
        ("--model.preset=gpt5", "model.preset 'gpt5' is unknown"),
        ("--train.seq_len=4096", "exceeds the model's context length (model.block_size = 256)"),
        ("--train.precision=fp8", "train.precision must be one of auto, bf16, fp32"),
        ("--optim.lr=-1", "optim.lr must be positive"),
        ("--model.n_layer=0", "model.n_layer must be a positive integer, got 0"),
        ("optim.lr", "must look like --section.key=value"),
    ],
)
def test_bad_overrides_get_clear_messages(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("quickstart", [override])


def test_bad_recipe_files(tmp_path):
    bad_type = tmp_path / "bad.toml"
    bad_type.write_text('[train]\nmax_steps = "100"\n')
    with pytest.raises(UserError, match=r"bad.toml: train.max_steps: expected int, got str"):
        load_config(str(bad_type))
    bad_toml = tmp_path / "broken.toml"
    bad_toml.write_text("[train\n")
    with pytest.raises(UserError, match="broken.toml: invalid TOML"):
        load_config(str(bad_toml))
    with pytest.raises(UserError, match="no recipe 'nope'.*quickstart"):
        load_config("nope")


def test_impossible_batch_arithmetic_suggests_a_fix():
    c = load_config("gpt2-124m-fineweb-edu-10b")
    message = (r"divisible by micro_batch_size × seq_len × world size = 64 × 1024 × 3 = 196,608; "
               r"try --train.total_batch_tokens=393216")
    with pytest.raises(UserError, match=message):
        grad_accum_steps(c, 3)


def test_every_setting_has_a_docstring_read_from_the_source():
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name in SECTIONS}
    classes = [cls for name, cls in sections.items() if name != "model"]
    classes += [arch.config_class for arch in ARCHITECTURES.values()]  # the model's fields: its architecture's
    for cls in classes:
        docs = field_docs(cls)
        assert set(docs) == {f.name for f in dataclasses.fields(cls)}, cls
        assert all(docs.values()), cls
    assert field_docs(sections["optim"])["lr"].startswith("Peak learning rate (AdamW's), reached after the warmup.")
    assert "50257 → 50304" in field_docs(ARCHITECTURES["gpt2"].config_class)["vocab_multiple"]  # from ModelConfig


def test_config_help_lists_every_key_with_its_type_and_default():
    text = config_help(width=100)
    flat = " ".join(text.split())
    config = load_config()
    for section in SECTIONS:
        values = config.model.to_dict() if section == "model" else dataclasses.asdict(getattr(config, section))
        for key in values:
            assert f"--{section}.{key} " in text, f"{section}.{key}"
    assert "--model.preset NAME default: gpt2" in flat
    for arch in ARCHITECTURES.values():  # the model listing comes from the registry
        assert arch.name in text and ", ".join(arch.presets) in flat
    assert "--optim.matrix_lr FLOAT (or none) default: none" in flat
    assert "--train.compile BOOL default: true" in flat and '--log.run_name STR default: ""' in flat
    assert max(map(len, text.splitlines())) <= 100


@dataclasses.dataclass
class _WideConfig(ARCHITECTURES["gpt2"].config_class):
    rope_base: float = 10000.0
    """Base of the rotary embedding's frequencies."""


def test_config_help_lists_another_architectures_own_fields_from_the_registry(monkeypatch):
    """An architecture added to the registry (as `modern` is being) shows up without touching the help code."""
    from gpt2forge.models import Architecture

    gpt2 = ARCHITECTURES["gpt2"]
    monkeypatch.setitem(ARCHITECTURES, "wide", Architecture("wide", _WideConfig, gpt2.model_class,
                                                            {"small": {}}, "small", "a test architecture"))
    flat = " ".join(config_help(width=100).split())
    assert "--model.arch {gpt2,modern,wide} default: gpt2" in flat and "wide: a test architecture" in flat
    assert "wide: small (default small)" in flat
    assert ("fields only arch wide has (--model.arch=wide; defaults: preset small): --model.rope_base FLOAT "
            "default: 10000.0 Base of the rotary embedding's frequencies.") in flat


@pytest.mark.parametrize("recipe, overrides", [
    ("quickstart", ["--optim.lr=1e-3", "--model.n_layer=3", "--eval.sample_prompt=Once upon",
                    "--log.trackers=tensorboard"]),
    (None, ["--train.max_steps=10", "--optim.decay_steps=5"]),  # no recipe: the defaults, an empty name
])
def test_print_config_prints_a_recipe_that_reads_back_identically(tmp_path, capsys, recipe, overrides):
    args = ["train", *(["--config", recipe] if recipe else []), *overrides, "--print-config"]
    assert main(args) == 0  # exits without training (no data directory exists here)
    printed = capsys.readouterr().out
    saved = tmp_path / "printed.toml"
    saved.write_text(printed)
    assert load_config(str(saved)) == load_config(recipe, overrides)
    assert printed.startswith("# memory per rank") and printed.endswith(to_toml(load_config(str(saved))))


def test_trackers_setting_and_the_old_switches():
    assert load_config("quickstart", ["--log.tensorboard=true", "--log.wandb=true"]).log.trackers == "tensorboard,wandb"
    assert load_config("quickstart", ["--log.tensorboard=false"]).log.trackers == ""
    c = load_config("quickstart", ["--log.wandb_project=mine", "--log.trackers=mlflow, Aim"])
    assert (c.log.trackers, c.log.project) == ("mlflow, Aim", "mine")
    with pytest.raises(UserError, match="log.trackers: unknown tracker.s. tensorbord; choose from tensorboard, wandb"):
        load_config("quickstart", ["--log.trackers=tensorbord"])


def test_trackers_are_accelerates_and_a_missing_package_names_its_install(tmp_path, monkeypatch):
    import importlib.util

    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    from gpt2forge.train.metrics import MetricsLogger

    assert set(TRACKERS) <= set(LOGGER_TYPE_TO_CLASS)
    real = importlib.util.find_spec
    missing = ("aim", "wandb")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    with pytest.raises(UserError, match="aim, wandb are not installed here: pip install aim wandb"):
        MetricsLogger(tmp_path, trackers="aim,wandb")
    with pytest.raises(UserError, match=r"pip install wandb \(or pip install 'gpt2forge\[log\]'\)"):
        MetricsLogger(tmp_path, trackers="wandb")
