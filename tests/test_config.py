import pytest

from gpt2forge.config import RECIPES_DIR, grad_accum_steps, load_config, to_toml
from gpt2forge.errors import UserError


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
    c = load_config("quickstart", ["--optim.lr=1e-3", "--train.max_steps", "5e3", "--train.compile=true", "--model.n_layer=3"])
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
    with pytest.raises(UserError, match=r"divisible by micro_batch_size × seq_len × world size = 64 × 1024 × 3 = 196,608; try --train.total_batch_tokens=393216"):
        grad_accum_steps(c, 3)
