"""The modern architecture (speedrun track 3): rotary positions, the KV cache, each config switch, sizes, weights
files, the registry and config, and training through the real trainer."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from gpt2forge.config import load_config
from gpt2forge.data.shards import write_shard
from gpt2forge.errors import UserError
from gpt2forge.models import Runtime, build_model, make_config, tied_weights
from gpt2forge.models.common import Rotary, apply_rotary
from gpt2forge.models.modern import ModernConfig, ModernGPT
from gpt2forge.sample import generate

VOCAB = 512


def small(**fields) -> ModernConfig:
    """Two layers, heads of 16 (8 dims rotate), a 32-token context, a 500-token vocabulary (padded to 512)."""
    sizes = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 500, "vocab_multiple": 64}
    return ModernConfig(**{**sizes, **fields})


def model_of(config: ModernConfig, runtime: Runtime | None = None, seed: int = 0) -> ModernGPT:
    torch.manual_seed(seed)
    return ModernGPT(config, runtime).eval()


# ---------------------------------------------------------------------------------------------- rotary positions
def test_rotary_scores_depend_only_on_distance_and_leave_the_other_dims_alone():
    torch.manual_seed(0)
    hs, r, T = 16, 8, 40
    cos, sin = Rotary(r, T, base=1024.0)(0, T)  # (T, r/2)
    q, k = torch.randn(hs), torch.randn(hs)
    rq = apply_rotary(q.expand(1, 1, T, hs), cos, sin)[0, 0]  # (T, hs): the same q at every position
    rk = apply_rotary(k.expand(1, 1, T, hs), cos, sin)[0, 0]
    scores = rq @ rk.T  # (T, T): scores[m, n] = q at m · k at n
    for offset in range(-T + 1, T):  # a Toeplitz matrix: constant along each diagonal, i.e. a function of m - n
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores[3, 0], scores[4, 0])  # ... and that function is not constant
    assert torch.equal(rq[:, r:], q[r:].expand(T, hs - r))  # the unrotated dims pass through bit for bit
    assert torch.equal(rq[0], q)  # position 0 is the identity
    assert not torch.allclose(rq[5, :r], q[:r])  # the others rotate, keeping each pair's length
    def pair_lengths(x):
        return x[..., : r // 2] ** 2 + x[..., r // 2 : r] ** 2

    torch.testing.assert_close(pair_lengths(rq), pair_lengths(q).expand(T, r // 2))


def test_rotary_frequencies_run_from_one_to_one_over_base():
    rotary = Rotary(8, 4, base=1024.0)
    angle = torch.atan2(rotary.sin[1], rotary.cos[1])  # radians per position, one per pair
    torch.testing.assert_close(angle, torch.tensor([1.0, 1024 ** (-1 / 3), 1024 ** (-2 / 3), 1 / 1024]))
    assert not dict(ModernGPT(small()).state_dict()).keys() & {"rotary.cos", "rotary.sin"}  # never stored


def test_without_rotary_a_one_layer_model_cannot_see_order():
    """One layer, no positions: the last token's keys and values are a bag of the earlier tokens."""
    idx = torch.tensor([[5, 9, 17, 33, 2, 7]])
    shuffled = torch.tensor([[33, 17, 5, 2, 9, 7]])  # the same tokens before the last one, reordered
    for fraction, order_matters in ((0.0, False), (0.5, True)):
        model = model_of(small(n_layer=1, rope_fraction=fraction, zero_init=False)).double()
        last, last_shuffled = model(idx)[0][0, -1], model(shuffled)[0][0, -1]
        assert torch.allclose(last, last_shuffled) != order_matters


# ----------------------------------------------------------------------------------------- cache and causality
NEXT = {"residual_scalars": True, "value_embeds": 1}  # the next-tier model switches, on


def perturbed(model: ModernGPT) -> ModernGPT:
    """``model`` with its residual scalars and value-embedding gates moved off their neutral init."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lambdas", "ve_gate.weight")):
                p.add_(torch.randn_like(p) * 0.5)
    return model


@pytest.mark.parametrize("attention, fields", [("sdpa", {}), ("manual", {}), ("sdpa", NEXT)])
def test_kv_cache_matches_full_passes_and_greedy_decoding(attention, fields):
    model = perturbed(model_of(small(zero_init=False, **fields), Runtime(attention=attention))).double()
    idx = torch.randint(0, 500, (2, 20))
    full = model(idx)[0]
    cache = model.new_cache(2)
    pieces = [model(idx[:, :7], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-12, rtol=1e-12)  # RoPE continued from cache.pos
    # 60 new tokens: past the 32-token context, so the window slides (and the cache is rebuilt) too
    with_cache = generate(model, idx[:, :7], 60, temperature=0, stop_token=None)
    without = generate(model, idx[:, :7], 60, temperature=0, stop_token=None, use_cache=False)
    assert with_cache.shape == (2, 67) and len(set(with_cache[:, 7:].flatten().tolist())) > 2
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("fields", [{}, NEXT])
def test_future_tokens_do_not_change_past_logits(fields):
    model = perturbed(model_of(small(zero_init=False, **fields)))
    idx = torch.randint(0, 500, (1, 20))
    changed = idx.clone()
    changed[0, 10:] = (idx[0, 10:] + 1) % 500
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_context_overflow_is_refused():
    model = model_of(small())
    cache = model.new_cache(1)
    model(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds the context length 32"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


# ----------------------------------------------------------------------------------------------- the switches
def test_defaults_are_track_3():
    c = make_config("modern")
    assert (c.n_layer, c.n_embd, c.head_dim, c.padded_vocab_size) == (12, 768, 128, 50304)
    assert (c.rope_base, c.rope_dims, c.attn_scale, c.logit_softcap, c.mlp) == (1024.0, 64, 0.12, 15.0, "relu2")
    assert c.logit_softcap_form == "algebraic"
    assert c.qk_norm and c.embed_norm and c.zero_init and c.bias and not c.tie_embeddings
    assert ModernConfig() == c  # the dataclass defaults are the default preset


def test_zero_init_zeroes_out_projections_and_head():
    model = model_of(small())
    zeroed = {n for n, p in model.named_parameters() if p.dim() == 2 and not p.any()}
    projections = {f"transformer.h.{i}.{m}.c_proj.weight" for i in (0, 1) for m in ("attn", "mlp")}
    assert zeroed == {"lm_head.weight"} | projections
    assert not model(torch.randint(0, 500, (1, 8)))[0].any()  # uniform first prediction
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.transformer.h[0].attn.c_q.weight.std().item() == pytest.approx((0.33 / 32) ** 0.5, rel=0.1)
    assert all(not p.any() for n, p in model.named_parameters() if n.endswith(".bias"))
    plain = model_of(small(zero_init=False))
    assert all(p.any() for n, p in plain.named_parameters() if n.endswith(".weight"))


@pytest.mark.parametrize("form, cap", [("algebraic", lambda x: 15 * x / torch.sqrt(x**2 + 15**2)),
                                       ("tanh", lambda x: 15 * torch.tanh(x / 15))])
@pytest.mark.parametrize("loss", ["reference", "chunked"])
def test_logit_softcap_forms(form, cap, loss):
    runtime = Runtime(loss=loss)
    capped = model_of(small(zero_init=False, logit_softcap_form=form), runtime)
    raw = model_of(small(zero_init=False, logit_softcap=0), runtime)
    with torch.no_grad():
        for m in (capped, raw):
            m.lm_head.weight.mul_(500)  # logits far beyond the cap
    idx = torch.randint(0, 500, (2, 10))
    logits, uncapped = capped(idx)[0], raw(idx)[0]
    assert uncapped.abs().max() > 100 and logits.abs().max() <= 15
    torch.testing.assert_close(logits, cap(uncapped))
    # The loss applies the same cap: the training path (chunked or not) scores the capped logits.
    targets = torch.randint(0, 500, (2, 10))
    torch.testing.assert_close(capped(idx, targets)[1], F.cross_entropy(cap(uncapped).flatten(0, 1), targets.flatten()))


def test_weights_files_without_a_softcap_form_meant_tanh():
    from gpt2forge.models import config_from_dict

    stored = small().to_dict()
    assert config_from_dict(stored).logit_softcap_form == "algebraic"
    del stored["logit_softcap_form"]  # written before the field existed
    assert config_from_dict(stored).logit_softcap_form == "tanh"


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    idx = torch.randint(0, 500, (1, 12))
    for qk_norm in (True, False):
        model = model_of(small(zero_init=False, qk_norm=qk_norm)).double()
        before = model(idx)[0]
        with torch.no_grad():
            for block in model.blocks:
                for lin in (block.attn.c_q, block.attn.c_k):
                    lin.weight.mul_(10), lin.bias.mul_(10)
        assert torch.allclose(model(idx)[0], before) == qk_norm


def test_embed_norm_makes_the_embedding_scale_free():
    idx = torch.randint(0, 500, (1, 12))
    for embed_norm in (True, False):
        model = model_of(small(zero_init=False, embed_norm=embed_norm)).double()
        assert ("transformer.ln_emb.weight" in model.state_dict()) == embed_norm
        before = model(idx)[0]
        with torch.no_grad():
            model.transformer.wte.weight.mul_(7)
        assert torch.allclose(model(idx)[0], before) == embed_norm


@pytest.mark.parametrize("mlp, activation", [("relu2", lambda h: F.relu(h) ** 2),
                                             ("gelu", lambda h: F.gelu(h, approximate="tanh"))])
def test_mlp_activation(mlp, activation):
    block_mlp = model_of(small(zero_init=False, mlp=mlp)).blocks[0].mlp
    x = torch.randn(3, 32)
    torch.testing.assert_close(block_mlp(x), block_mlp.c_proj(activation(block_mlp.c_fc(x))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_squared_is_autograds_chain_bit_for_bit(dtype):
    from gpt2forge.models.modern import relu_squared

    h = torch.randn(4, 64, 96).to(dtype)
    h[0, 0, :8] = 0.0  # the kink: relu's gradient there is 0 in both
    grad = torch.randn_like(h)
    outs = []
    for f in (relu_squared, lambda x: F.relu(x).square()):
        x = h.clone().requires_grad_()
        y = f(x)
        y.backward(grad)
        outs.append((y.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    x = h.clone().requires_grad_()
    torch.compile(relu_squared, backend="aot_eager")(x).backward(grad)  # traceable: the compiled recipes use it
    torch.testing.assert_close(x.grad, outs[1][1])


def test_tied_and_untied_heads():
    untied, tied = model_of(small()), model_of(small(tie_embeddings=True))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() - tied.num_params() == 512 * 32
    # the head's init, not N(0, 1)
    assert tied.lm_head.weight.std().item() == pytest.approx((0.33 / 32) ** 0.5, rel=0.1)
    assert tied_weights(tied.config) == {"lm_head.weight": "transformer.wte.weight"}
    assert tied_weights(untied.config) == {}
    assert tied(torch.randint(0, 500, (1, 8)))[0].any()  # zero_init leaves a tied head alone


def test_bias_and_attention_scale_switches():
    assert not [n for n, _ in model_of(small(bias=False)).named_parameters() if n.endswith("bias")]
    idx = torch.randint(0, 500, (1, 12))
    default = model_of(small(zero_init=False, attn_scale=0.0)).double()
    explicit = model_of(small(zero_init=False, attn_scale=16**-0.5)).double()
    track3 = model_of(small(zero_init=False)).double()
    torch.testing.assert_close(default(idx)[0], explicit(idx)[0])
    assert not torch.allclose(default(idx)[0], track3(idx)[0])


def test_every_switch_off_still_builds_and_learns_something():
    config = small(rope_fraction=0.0, qk_norm=False, mlp="gelu", embed_norm=False, tie_embeddings=True,
                   zero_init=False, logit_softcap=0.0, bias=False, attn_scale=0.0)
    model = model_of(config).train()
    idx = torch.randint(0, 500, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in model.parameters())


def test_residual_scalars_start_neutral_and_mix_in_the_embedding():
    base = model_of(small(zero_init=False))
    mixed = model_of(small(zero_init=False, residual_scalars=True))
    assert mixed.load_state_dict(base.state_dict(), strict=False).missing_keys == [
        "transformer.h.0.lambdas", "transformer.h.1.lambdas"]
    idx = torch.randint(0, 500, (2, 12))
    assert torch.equal(mixed(idx)[0], base(idx)[0])  # (1, 0): exactly the model without them
    with torch.no_grad():
        mixed.transformer.h[1].lambdas.copy_(torch.tensor([0.5, 2.0]))
    assert not torch.allclose(mixed(idx)[0], base(idx)[0])
    # block 1 sees 0.5·x + 2·x0: the same as a block without scalars fed that input
    x0 = mixed.transformer.ln_emb(mixed.transformer.wte(idx))
    rope = mixed.rotary(0, 12)
    x1 = base.transformer.h[0](x0, rope)
    torch.testing.assert_close(mixed.transformer.h[1](x1, rope, None, x0), base.transformer.h[1](0.5 * x1 + 2 * x0,
                                                                                                   rope))
    _, loss = mixed.train()(idx, idx)
    loss.backward()
    assert all(b.lambdas.grad.abs().min() > 0 for b in mixed.transformer.h)


def test_value_embeddings_serve_the_first_and_last_layers_through_a_gate():
    config = small(n_layer=6, value_embeds=2)
    assert [config.value_embed_table(i) for i in range(6)] == [0, 1, None, None, 0, 1]
    model = model_of(small(zero_init=False, value_embeds=1))
    assert [hasattr(b.attn, "ve_gate") for b in model.transformer.h] == [True, True]
    assert not model.transformer.h[0].attn.ve_gate.weight.any()  # gate 2·sigmoid(0) = 1 at init
    base = model_of(small(zero_init=False))
    model.load_state_dict(base.state_dict(), strict=False)
    idx = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        model.transformer.ve[0].weight.zero_()
    torch.testing.assert_close(model(idx)[0], base(idx)[0], atol=0, rtol=0)  # an empty table adds nothing
    with torch.no_grad():
        model.transformer.ve[0].weight.normal_()
    assert not torch.allclose(model(idx)[0], base(idx)[0])
    # what it adds: gate · the token's row, per head, to the values of each served layer
    attn, x = model.transformer.h[0].attn, torch.randn(2, 12, 32)
    ve = model.transformer.ve[0](idx)
    with torch.no_grad():
        attn.ve_gate.weight.normal_()
    gate = 2 * torch.sigmoid(x[..., :12] @ attn.ve_gate.weight.T)  # (B, T, nh)
    hook = attn.c_v.register_forward_hook(lambda m, i, out: out + (gate[..., None] * ve.view(2, 12, 2, 16)).view(
        2, 12, 32))
    rope = model.rotary(0, 12)
    expected = attn(x, rope)  # the plain path, with the value embedding added by the hook
    hook.remove()
    torch.testing.assert_close(attn(x, rope, None, ve), expected)
    _, loss = model.train()(idx, idx)
    loss.backward()
    assert model.transformer.ve[0].weight.grad[idx.flatten()].abs().sum() > 0
    assert model.transformer.ve[0].weight.grad[501:].abs().sum() == 0  # only the rows looked up
    assert all(b.attn.ve_gate.weight.grad.abs().sum() > 0 for b in model.transformer.h)


def test_next_tier_parameters_get_their_own_roles_and_lrs():
    from gpt2forge.config import OptimSection
    from gpt2forge.models import parameter_roles
    from gpt2forge.optim import build_optimizers

    model = model_of(small(**NEXT))
    roles = parameter_roles(model)
    assert roles["transformer.ve.0.weight"] == "value_embed"
    assert roles["transformer.h.0.lambdas"] == roles["transformer.h.1.attn.ve_gate.weight"] == "lambda"
    assert roles["transformer.h.0.attn.c_v.weight"] == "matrix" and roles["transformer.wte.weight"] == "embedding"
    optim = OptimSection(optimizer="muon", lr=0.01, embedding_lr=0.5, scalar_lr=0.02, lambda_lr=0.04,
                         weight_decay=0.1, scalar_weight_decay=0.1, warmup_steps=0)
    opts = build_optimizers(model, optim, "cpu", max_steps=10)
    opts.set_step(0)
    by_roles = {spec.roles: (group["lr"], group["weight_decay"])
                for name, o in opts.items() for group, spec in zip(o.param_groups, opts.specs[name])}
    assert by_roles[("lambda",)] == (pytest.approx(0.04), 0.0)  # never decayed
    assert by_roles[("embedding", "value_embed")] == (pytest.approx(0.5), 0.1)  # unset: the embedding's LR
    opts = build_optimizers(model, dataclasses.replace(optim, value_embed_lr=0.3), "cpu", max_steps=10)
    opts.set_step(0)
    assert [g["lr"] for g, spec in zip(opts.optimizers["adamw"].param_groups, opts.specs["adamw"])
            if spec.roles == ("value_embed",)] == [pytest.approx(0.3)]
    muon = {id(p) for g in opts.optimizers["muon"].param_groups for p in g["params"]}
    assert id(model.transformer.h[0].attn.ve_gate.weight) not in muon
    assert OptimSection(scalar_lr=0.3).role_lr("lambda") == 0.3


def test_value_embeddings_count_as_embeddings_not_flops():
    plain, ve = model_of(small()), model_of(small(value_embeds=1))
    table = 512 * 32
    gates = 2 * (2 * 12)  # two layers × (heads × 12 inputs)
    assert ve.num_params() == plain.num_params() + table + gates
    assert ve.num_params(non_embedding=True) == plain.num_params(non_embedding=True) + gates
    from gpt2forge.models import padding_params

    assert padding_params(ve) == padding_params(plain) + 12 * 32  # the table's 12 padded rows


@pytest.mark.parametrize("field, value, message", [
    ("value_embeds", 2, "model.value_embeds must be an integer from 0 to n_layer/2 = 1"),
    ("value_embeds", -1, "model.value_embeds"), ("residual_scalars", 1, "model.residual_scalars"),
    ("rope_fraction", 0.3, "model.rope_fraction"), ("rope_fraction", 1.5, "model.rope_fraction"),
    ("rope_base", 0.0, "model.rope_base"), ("mlp", "swiglu", "model.mlp"),
    ("logit_softcap", -1.0, "model.logit_softcap"), ("logit_softcap_form", "erf", "model.logit_softcap_form"),
    ("attn_scale", -1.0, "model.attn_scale"), ("qk_norm", "yes", "model.qk_norm"), ("n_head", 5, "model.n_head"),
])
def test_bad_values_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        small(**{field: value})


# ------------------------------------------------------------------------------------------------ sizes, FLOPs
def test_gpt2_preset_parameter_count_and_flops():
    V, C, L, T = 50304, 768, 12, 1024
    block = 4 * (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C) + 2 * C  # q, k, v, proj; fc; proj; two gains
    untied = V * C + 2 * C + L * block + (C * V + V)  # embedding, its norm and ln_f, blocks, head with its bias
    assert untied == 162_354_816
    with torch.device("meta"):
        model = build_model(make_config("modern", "gpt2"))
        tied = build_model(make_config("modern", "gpt2", tie_embeddings=True))
    assert model.num_params() == untied
    assert model.num_params(non_embedding=True) == untied - V * C  # the lookup table drops, the head stays
    assert tied.num_params() == tied.num_params(non_embedding=True) == untied - V * C == 123_721_344
    assert model.flops_per_token(T) == 6 * (untied - V * C) + 12 * L * C * T  # 742M + 113M ≈ 856 MFLOP
    assert tied.flops_per_token(T) == model.flops_per_token(T)


# ------------------------------------------------------------------------------------------ weights and export
@pytest.mark.parametrize("tie, fields", [(False, {}), (True, {}), (False, NEXT)])
def test_weights_round_trip(tmp_path, tie, fields):
    from gpt2forge.weights import MODEL_FILE, load_model, save_model

    model = perturbed(model_of(small(tie_embeddings=tie, **fields)))
    with torch.no_grad():
        model.lm_head.weight.normal_()  # not the zeros of zero_init (tied: the embedding too)
    save_model(model, tmp_path)
    with safe_open(tmp_path / MODEL_FILE, framework="pt") as f:
        stored = set(f.keys())
    assert ("lm_head.weight" in stored) != tie  # a tie is stored once
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tie
    if not tie:
        assert not torch.equal(loaded.lm_head.weight[:500], loaded.transformer.wte.weight[:500])
    idx = torch.randint(0, 500, (1, 9))
    assert torch.equal(loaded(idx)[0], model(idx)[0])


# ---------------------------------------------------------------------------------------- registry and config
def test_registry_builds_and_refuses_unknown_fields():
    config = make_config("modern", "tiny", n_layer=2)
    assert isinstance(config, ModernConfig) and (config.n_layer, config.head_dim) == (2, 64)
    assert isinstance(build_model(config), ModernGPT)
    with pytest.raises(ValueError, match="model.rotary"):
        make_config("modern", "tiny", rotary=True)
    with pytest.raises(ValueError, match="model.qk_norm"):
        make_config("gpt2", "tiny", qk_norm=False)  # a modern field is not GPT-2's


def test_training_config_selects_modern():
    config = load_config(None, ["--model.arch=modern", "--model.preset=tiny", "--model.qk_norm=false",
                                "--model.attn_scale=0", "--train.seq_len=256"])
    assert isinstance(config.model, ModernConfig)
    assert not config.model.qk_norm and config.model.attn_scale == 0.0 and config.model.n_embd == 128
    with pytest.raises(UserError, match="model.mlp"):
        load_config(None, ["--model.arch=modern", "--model.mlp=swish"])


# -------------------------------------------------------------------------------------------- training on CPU
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Synthetic shards with learnable structure (a noisy repeating pattern) over a 512-token vocabulary."""
    directory = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, VOCAB, 97)
    for i, n in enumerate([4000, 20000]):
        tokens = np.resize(pattern, n)
        noise = rng.random(n) < 0.2
        tokens[noise] = rng.integers(0, VOCAB, noise.sum())
        write_shard(directory / f"synthetic_{'val' if i == 0 else 'train'}_{i:06d}.bin", tokens.astype(np.uint16))
    return directory


def train_overrides(data_dir, out_dir, **extra):
    settings = {
        "model.arch": "modern", "model.preset": "tiny", "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32,
        "model.block_size": 32, "model.vocab_size": VOCAB, "model.vocab_multiple": 64,
        "data.dir": data_dir, "log.out_dir": out_dir, "log.run_name": "run",
        "train.max_steps": 8, "train.micro_batch_size": 4, "train.seq_len": 32, "train.total_batch_tokens": 256,
        "train.device": "cpu", "train.precision": "fp32", "train.compile": False,
        "optim.lr": 1e-2, "optim.warmup_steps": 2, "optim.min_lr": 1e-3, "optim.decay_steps": 8,
        "eval.val_every": 4, "eval.val_tokens": 512, "eval.hellaswag_every": 0, "eval.sample_every": 0,
        "checkpoint.every": 4, "checkpoint.keep_last": 2, "log.every": 1, **extra,
    }
    return [f"--{k}={v}" for k, v in settings.items()]


def train_config(data_dir, out_dir, **extra):
    return load_config(None, train_overrides(data_dir, out_dir, **extra))


# every next-tier switch on: the model's residual scalars and value embeddings, Muon's momentum warmup and
# cooldown, NorMuon and the cautious decay
ALL_SWITCHES = {"model.residual_scalars": True, "model.value_embeds": 1, "optim.optimizer": "muon",
                "optim.matrix_lr": 0.02, "optim.matrix_weight_decay": 0.5, "optim.lambda_lr": 0.02,
                "optim.value_embed_lr": 0.05, "optim.muon_momentum_warmup_steps": 2,
                "optim.muon_momentum_cooldown_steps": 3, "optim.muon_cautious_wd": True, "optim.muon_normuon": True}


@pytest.mark.parametrize("switches", [{}, ALL_SWITCHES], ids=["track3", "all-switches"])
def test_training_learns_resumes_exactly_and_samples(data_dir, tmp_path, switches):
    import shutil

    from gpt2forge.train.trainer import train
    from gpt2forge.weights import load_model

    full = train(train_config(data_dir, tmp_path / "a", **switches))
    assert full.losses[1] == pytest.approx(math.log(VOCAB), abs=1e-4)  # zero-init head: uniform at first
    assert full.losses[8] < full.losses[1] - 0.5  # it learns
    if switches:  # resume from the uninterrupted run's step-4 checkpoint: the momentum cooldown follows
        shutil.copytree(full.run_dir, tmp_path / "b" / "run")  # train.max_steps, so a 4-step launch would differ
        shutil.rmtree(tmp_path / "b" / "run" / "step-000008")
    else:
        train(train_config(data_dir, tmp_path / "b", **{"train.max_steps": 4}))
    resumed = train(train_config(data_dir, tmp_path / "b", **switches), resume="auto")
    assert resumed.losses == {s: full.losses[s] for s in range(5, 9)}  # exact float equality
    if switches:
        saved = torch.load(tmp_path / "b" / "run" / "step-000004" / "optimizer.pt", weights_only=True)
        assert all({"momentum_buffer", "second_moment"} <= set(s) for s in saved["muon"]["state"].values())

    model = load_model(full.run_dir)
    assert isinstance(model, ModernGPT) and model.lm_head.weight.any()
    # the untied head went through two saves and a resume as itself: bit for bit the uninterrupted run's
    head = load_model(resumed.run_dir).lm_head.weight
    assert torch.equal(head, model.lm_head.weight)
    assert not torch.equal(head, load_model(resumed.run_dir).transformer.wte.weight)
    from gpt2forge.commands import main

    assert main(["export", str(full.run_dir), str(tmp_path / "hf")]) == 0  # the remote code computes it all
    assert (tmp_path / "hf" / "modeling_gpt2forge.py").exists()
    prompt = torch.randint(0, VOCAB, (2, 5))
    out = generate(model, prompt, 40, temperature=1.0, generator=torch.Generator().manual_seed(0), stop_token=None)
    assert out.shape == (2, 45) and int(out.max()) < VOCAB


def test_every_switch_on_two_processes_train_as_one(data_dir, tmp_path):
    """2-process DDP with every switch (Muon shares Newton–Schulz among the ranks; NorMuon and the cautious decay
    run on every rank) and 2-process FSDP with the model's switches (AdamW: Muon refuses FSDP) give the losses of
    one process with two accumulation steps."""
    from test_train import metric_losses, torchrun

    from gpt2forge.train.trainer import train

    model_switches = {k: v for k, v in ALL_SWITCHES.items() if k.startswith("model.") or k.endswith("_lr")}
    for name, switches in (("ddp", ALL_SWITCHES), ("fsdp", {**model_switches, "train.distributed": "fsdp"})):
        settings = {**switches, "eval.val_every": 0, "checkpoint.every": 0}
        single = train(train_config(data_dir, tmp_path / f"single-{name}",
                                    **{k: v for k, v in settings.items() if k != "train.distributed"}))
        torchrun(["train", *train_overrides(data_dir, tmp_path / name, **settings)])
        shared = metric_losses(tmp_path / name / "run")
        assert shared.keys() == single.losses.keys()
        for step, loss in single.losses.items():
            assert shared[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), name
