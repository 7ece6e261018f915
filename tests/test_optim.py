"""Optimizers from named parameter groups, and the schedules: pure functions of the step."""

import pytest
import torch

from gpt2forge.config import OptimSection, load_config
from gpt2forge.models import build_model, make_config, parameter_roles
from gpt2forge.optim import build_optimizers, lr_at, muon_momentum_at
from gpt2forge.optim.muon import Muon


def tiny(**fields):
    torch.manual_seed(0)
    return build_model(make_config("gpt2", "tiny", n_layer=2, vocab_size=512, vocab_multiple=64, **fields))


def test_gpt2_recipe_gets_exactly_its_two_adamw_groups():
    """The reference recipe's optimizer as build-nanogpt built it: one AdamW, decay on ≥ 2-D weights (in the
    model's parameter order), none on gains and biases."""
    model = tiny()
    opts = build_optimizers(model, load_config("gpt2-124m-fineweb-edu-10b").optim, "cpu", max_steps=100)
    assert list(opts.optimizers) == ["adamw"]
    groups = opts.optimizers["adamw"].param_groups
    params = [p for p in model.parameters()]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert groups[0]["params"] == [p for p in params if p.dim() >= 2]
    assert groups[1]["params"] == [p for p in params if p.dim() < 2]
    assert {s.roles for s in opts.specs["adamw"]} == {("embedding", "matrix"), ("scalar",)}


def test_roles_come_from_the_model():
    roles = parameter_roles(tiny())
    assert roles["transformer.wte.weight"] == roles["transformer.wpe.weight"] == "embedding"
    assert "lm_head.weight" not in roles  # tied: the embedding, listed once
    assert roles["transformer.h.0.attn.c_attn.weight"] == roles["transformer.h.1.mlp.c_proj.weight"] == "matrix"
    assert roles["transformer.h.0.ln_1.weight"] == roles["transformer.h.0.attn.c_attn.bias"] == "scalar"


def test_muon_takes_the_matrices_and_each_role_its_own_lr():
    optim = OptimSection(optimizer="muon", lr=1e-3, matrix_lr=0.02, embedding_lr=0.3, scalar_lr=0.01,
                         matrix_weight_decay=0.05, weight_decay=0.0)
    model = tiny()
    opts = build_optimizers(model, optim, "cpu", max_steps=100)
    assert isinstance(opts.optimizers["muon"], Muon)
    roles = parameter_roles(model)
    named = dict(model.named_parameters())
    muon_params = {id(p) for g in opts.optimizers["muon"].param_groups for p in g["params"]}
    assert muon_params == {id(named[n]) for n, r in roles.items() if r == "matrix"}
    assert opts.optimizers["muon"].param_groups[0]["weight_decay"] == 0.05
    opts.set_step(50)  # past the warmup: every group at its own peak times the same schedule factor
    factor = lr_at(50, optim, 100) / optim.lr
    lrs = {spec.roles: g["lr"] for name, o in opts.items() for g, spec in zip(o.param_groups, opts.specs[name])}
    assert lrs[("matrix",)] == pytest.approx(0.02 * factor)
    assert lrs[("embedding",)] == pytest.approx(0.3 * factor)
    assert lrs[("scalar",)] == pytest.approx(0.01 * factor)
    assert opts.optimizers["muon"].param_groups[0]["momentum"] == muon_momentum_at(50, optim, 100)


def test_schedules_are_pure_functions_of_the_step():
    cosine = OptimSection(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cosine, 100) == pytest.approx(0.1) and lr_at(9, cosine, 100) == pytest.approx(1.0)
    assert lr_at(55, cosine, 100) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(100, cosine, 100) == lr_at(500, cosine, 100) == 0.1
    wsd = OptimSection(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="wsd", cooldown_fraction=0.4)
    assert [lr_at(s, wsd, 100) for s in (0, 30, 59, 60)] == [1.0, 1.0, 1.0, 1.0]
    assert lr_at(80, wsd, 100) == pytest.approx(0.5) and lr_at(100, wsd, 100) == 0.0
    steps = [lr_at(s, wsd, 100) for s in range(60, 101)]
    assert all(a > b for a, b in zip(steps, steps[1:]))  # strictly decreasing through the cooldown
    optim = OptimSection(muon_momentum_start=0.85, muon_momentum=0.95, muon_momentum_warmup_steps=300)
    assert [muon_momentum_at(s, optim, 2000) for s in (0, 150, 300, 1000, 1999)] == pytest.approx(
        [0.85, 0.90, 0.95, 0.95, 0.95])


def test_muon_momentum_cools_down_over_the_last_steps():
    optim = OptimSection(muon_momentum_start=0.85, muon_momentum=0.95, muon_momentum_warmup_steps=10,
                         muon_momentum_cooldown_steps=50)
    assert [muon_momentum_at(s, optim, 1000) for s in (5, 10, 949, 950, 974, 999)] == pytest.approx(
        [0.90, 0.95, 0.95, 0.95 - 0.1 / 50, 0.90, 0.85])
    opts = build_optimizers(tiny(), OptimSection(optimizer="muon", muon_momentum_cooldown_steps=50), "cpu", 1000)
    opts.set_step(999)
    assert opts.optimizers["muon"].param_groups[0]["momentum"] == pytest.approx(0.85)  # the trainer sees it


def test_cautious_weight_decay_follows_the_lr_schedule():
    optim = OptimSection(optimizer="muon", lr=0.01, matrix_lr=0.02, matrix_weight_decay=0.5, warmup_steps=0,
                         schedule="wsd", cooldown_fraction=0.5, min_lr=0.0, muon_cautious_wd=True)
    opts = build_optimizers(tiny(), optim, "cpu", max_steps=100)
    group = opts.optimizers["muon"].param_groups[0]
    assert group["cautious_wd"] and opts.specs["muon"][0].weight_decay == 0.5
    for step, fraction in ((10, 1.0), (75, 0.5)):
        opts.set_step(step)
        assert group["lr"] == pytest.approx(0.02 * fraction) and group["weight_decay"] == pytest.approx(0.5 * fraction)
    plain = build_optimizers(tiny(), OptimSection(optimizer="muon", matrix_weight_decay=0.5), "cpu", max_steps=100)
    plain.set_step(75)
    assert plain.optimizers["muon"].param_groups[0]["weight_decay"] == 0.5  # off: the decay stays as set
    assert not plain.optimizers["muon"].param_groups[0]["cautious_wd"]
    assert not plain.optimizers["muon"].param_groups[0]["normuon"]


def test_track3_recipe_decays_gains_and_biases_and_the_reference_does_not():
    """Track 3 gives every AdamW group weight decay 0.001, gains and biases included (``scalar_weight_decay``);
    GPT-2's recipe keeps them undecayed (the default)."""
    model = build_model(make_config("modern", "tiny", n_layer=2, vocab_size=512, vocab_multiple=64))
    opts = build_optimizers(model, load_config("quickstart-modern").optim, "cpu", max_steps=100)
    by_roles = {spec.roles: group["weight_decay"]
                for name, o in opts.items() for group, spec in zip(o.param_groups, opts.specs[name])}
    assert by_roles == {("embedding",): 0.001, ("scalar",): 0.001, ("head",): 0.001, ("matrix",): 0.05}
    assert OptimSection().scalar_weight_decay == 0.0
    muon = opts.optimizers["muon"].param_groups[0]
    assert (muon["ns"], muon["ns_steps"], muon["ns_eps"]) == ("track3", None, 1e-7 / 2048)


def test_newton_schulz_choices_are_muons_variants():
    from gpt2forge.config import CHOICES
    from gpt2forge.errors import UserError
    from gpt2forge.optim.muon import NS_VARIANTS

    assert CHOICES["optim.muon_ns"] == tuple(NS_VARIANTS)
    with pytest.raises(UserError, match="optim.muon_ns must be one of jordan5, track3, polar_express"):
        load_config(None, ["optim.muon_ns=cubic"])
    with pytest.raises(UserError, match="optim.muon_ns_steps .6. must be at most 5 with optim.muon_ns=polar_express"):
        load_config(None, ["optim.muon_ns=polar_express", "optim.muon_ns_steps=6"])
    with pytest.raises(UserError, match="optim.scalar_weight_decay must be ≥ 0"):
        load_config(None, ["optim.scalar_weight_decay=-1"])
    with pytest.raises(UserError, match=r"optim.muon_beta2 must be in \[0, 1\)"):
        load_config(None, ["optim.muon_beta2=1"])
    with pytest.raises(UserError, match="optim.muon_momentum_cooldown_steps must be ≥ 0"):
        load_config(None, ["optim.muon_momentum_cooldown_steps=-1"])
