"""The time-to-quality benchmark follows its protocol: LR sweeps that extend until the best is inside, the same LR
floor rule for every arm, shorter budgets as separate runs with their own schedules, fitted curves whose
tokens-to-target and intervals come from the table, bits per byte from the bytes the scored tokens decode to, and
a lossless proxy vocabulary."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2forge.config import RECIPES_DIR, load_config
from gpt2forge.data.loader import val_batches
from gpt2forge.models import IGNORE_INDEX
from gpt2forge.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import proxy_data  # noqa: E402
import time_to_quality as ttq  # noqa: E402


def test_proxy_vocabulary_is_lossless_and_spells_rare_tokens_in_bytes():
    tokenizer = get_tokenizer()
    common = "the of and to a in is that for it " * 50
    vocab = proxy_data.ProxyVocab.build(np.array(tokenizer.encode(common)), 300)
    assert vocab.size <= 300 and vocab.gpt2_ids[256] == tokenizer.eot
    text = "the Übersetzung of naïve 東京 tokens\n\tand emoji 🙂" + common[:40]
    gpt2 = np.array(tokenizer.encode(text) + [tokenizer.eot])
    ids = vocab.encode(gpt2)
    assert ids.max() < vocab.size and len(ids) > len(gpt2)  # rare tokens were spelt out
    assert vocab.decode_bytes(ids) == text.encode()
    assert vocab.byte_lengths[ids].sum() == len(text.encode())  # <|endoftext|> has no bytes
    kept = vocab.encode(np.array(tokenizer.encode(" the")))
    assert len(kept) == 1  # a frequent token stays one token


def test_proxy_data_keeps_only_the_sets_it_was_built_with(tmp_path):
    """Rebuilt without ``heldout`` (another checkout, another path), the HellaSwag set an earlier build wrote is
    removed, and the benchmark scores the sets the build records, not whatever directories are there."""
    heldout = ROOT / "tests" / "data" / "hellaswag_val_head64.jsonl"
    documents = {"prose": [f"Paragraph {i} of plain English prose, about tokens and words." for i in range(300)],
                 "topics": ["Another kind of text, never trained on."] * 20}
    meta = proxy_data.build(tmp_path, 300, 500, heldout, documents=documents)
    assert "hellaswag_val" in meta["stats"] and (tmp_path / "hellaswag").is_dir()
    meta = proxy_data.build(tmp_path, 300, 500, None, documents=documents)
    assert "hellaswag_val" not in meta["stats"] and not (tmp_path / "hellaswag").exists()
    assert (tmp_path / "topics").is_dir()


def test_sweep_extends_on_the_side_of_the_best_until_it_is_inside(monkeypatch):
    def fake_run(ctx, arm, mult, steps, seed):  # a loss valley at multiplier 8
        return {"val": {"prose": {"loss": 3 + (math.log2(mult) - 3) ** 2 + 0.01 * seed}}}

    monkeypatch.setattr(ttq, "run_once", fake_run)
    ctx = ttq.Context(ttq.TIERS["quick"], Path("."), {}, Path("."), 10, 0.1)
    up, down = ttq.ARMS["modern"], ttq.ARMS["baseline"]
    s = ttq.sweep(ctx, [up], [0.5, 1, 2], 2.0, 5, [0, 1])["modern"]
    assert s["mults"] == [0.5, 1, 2, 4, 8, 16] and s["best"] == 8 and s["interior"] and s["extended"] == 3
    s = ttq.sweep(ctx, [up, down], [64, 128], 2.0, 2, [0])  # downwards, and the cap on extensions
    assert s["baseline"] == s["modern"]
    assert s["modern"]["mults"] == [16, 32, 64, 128] and s["modern"]["best"] == 16
    assert not s["modern"]["interior"] and s["modern"]["extended"] == 2


def test_fit_recovers_a_power_law_and_inverts_it():
    x = np.array([0.2, 0.35, 0.5, 1.0])
    e, a, alpha = 3.0, 0.8, 0.6
    params = ttq.fit_curve(x, e + a * x ** -alpha)
    assert params == pytest.approx((e, a, alpha), rel=1e-3)
    assert ttq.tokens_to(params, e + a * 0.3 ** -alpha) == pytest.approx(0.3, rel=1e-3)
    assert ttq.tokens_to(params, e - 0.1) == math.inf  # below the asymptote: never


def test_quick_benchmark_follows_the_protocol(tmp_path):
    results, work = tmp_path / "results", tmp_path / "w"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "time_to_quality.py"), "--quick", "--work", str(work),
           "--results", str(results), "--arms", "baseline,modern", "--seeds", "0,1", "--fractions", "1,0.5,0.25",
           "--lr-mults", "0.02,0.04", "--max-extend", "2", "--bootstrap", "50", "--no-timing",
           "--screen", "modern-tied"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((results / "time-to-quality-quick.json").read_text())
    assert (results / "time-to-quality-quick.png").stat().st_size > 0
    assert "## Result" in (results / "time-to-quality-quick.md").read_text()
    assert "| modern |" in (results / "ablation-quick.md").read_text()

    for arm in data["arms"].values():
        s = arm["sweep"]  # tiny LRs: the best is the largest, so the sweep must have grown upwards
        assert s["extended"] >= 1 and s["mults"][:2] == [0.02, 0.04]
        assert all(b == pytest.approx(2 * a) for a, b in zip(s["mults"], s["mults"][1:]))
        means = {float(m): v for m, v in s["means"].items()}
        assert s["best"] == min(means, key=means.get)
        assert s["interior"] or s["extended"] == 2
    for run in data["runs"]:
        config = load_config(str(Path(run["run_dir"]) / "config.toml"))
        assert config.train.max_steps == run["steps"]  # a shorter budget is its own full run
        assert config.optim.min_lr == pytest.approx(0.1 * config.optim.lr)  # one floor rule for every arm
        assert run["tokens"] == run["steps"] * data["tokens_per_step"]
    assert sorted({(r["arm"], r["steps"], r["seed"]) for r in data["runs"] if r["steps"] < data["steps"]}) == [
        (arm, steps, seed) for arm in ("baseline", "modern") for steps in (2, 4) for seed in (0, 1)]

    screened = data["screen"]["modern-tied"]  # at N, at modern's LR, every seed, compared seed by seed
    modern_n = sorted((r["seed"], r) for r in data["runs"] if r["arm"] == "modern" and r["steps"] == data["steps"]
                      and r["mult"] == data["arms"]["modern"]["sweep"]["best"])
    assert [(r["seed"], r["steps"], r["mult"]) for r in screened["runs"]] == [
        (seed, data["steps"], data["arms"]["modern"]["sweep"]["best"]) for seed in (0, 1)]
    for name in data["valsets"]:
        deltas = [a["val"][name]["loss"] - m["val"][name]["loss"] for a, (_, m) in zip(screened["runs"], modern_n)]
        assert screened["val"][name]["delta"] == pytest.approx(np.mean(deltas))
        lo, hi = screened["val"][name]["interval"]
        assert min(deltas) - 1e-9 <= lo <= hi <= max(deltas) + 1e-9
    assert screened["against"] == "modern"
    assert "modern-tied" not in data["arms"] and "## Screened at N only" in (results / "ablation-quick.md").read_text()

    meta = json.loads((work / "quick" / "data" / "vocab.json").read_text())
    vocab = proxy_data.ProxyVocab(meta["gpt2_ids"])
    for name, vs in data["valsets"].items():  # the bytes behind bpb: the scored targets, decoded
        targets = np.concatenate([y[y != IGNORE_INDEX].numpy() for _, y in val_batches(vs["dir"], 7, 32,
                                                                                       max_tokens=4096)])
        assert len(targets) == vs["tokens"] and len(vocab.decode_bytes(targets)) == vs["bytes"]
        for run in data["runs"]:
            v = run["val"][name]
            assert v["bpb"] == pytest.approx(v["loss"] * vs["tokens"] / vs["bytes"] / math.log(2))

    for name, analysis in data["analysis"].items():
        target = analysis["target"]
        baseline_n = [r["val"][name]["loss"] for r in data["runs"]
                      if r["arm"] == "baseline" and r["steps"] == data["steps"] and r["mult"] ==
                      data["arms"]["baseline"]["sweep"]["best"]]
        assert target == pytest.approx(np.mean(baseline_n))
        for arm in analysis["arms"].values():
            x = np.array([row["fraction"] for row in arm["rows"]])
            y = np.array([row["loss"][0] for row in arm["rows"]])
            assert arm["fit"] == pytest.approx(ttq.fit_curve(x, y), rel=1e-6)  # the fit is of the table's means
            assert arm["tokens_to_target"] == pytest.approx(ttq.tokens_to(arm["fit"], target))
            lo, hi = arm["tokens_to_target_interval"]
            assert lo <= hi


def test_every_built_in_arm_is_its_recipe_with_one_part_switched():
    ctx = ttq.Context(ttq.TIERS["tiny"], Path("."), {}, Path("."), 100, 0.1,
                      {**ttq.TIERS["tiny"].overrides, "model.vocab_size": 2048, "model.vocab_multiple": 1})
    modern = ctx.arm_config(ttq.ARMS["modern"])
    for name, arm in ttq.ARMS.items():
        config = ctx.arm_config(arm)  # every arm's config loads (model keys its architecture accepts)
        assert config.model.n_embd == 128 and config.model.n_embd // config.model.n_head == 128
        if name.startswith("modern") and name != "modern-adamw":
            assert config.optim.optimizer == "muon"
        if name.startswith("modern"):  # every arm starts from track 3, whatever the recipe adopted on top
            assert config.optim.muon_normuon == (name == "modern+normuon"), name
            assert config.optim.muon_ns == "track3", name
    assert ctx.arm_config(ttq.parse_arm("x=--optim.muon_cautious_wd=true")).optim.muon_normuon is False
    gpt2arch = ctx.arm_config(ttq.ARMS["modern-gpt2arch"])
    assert gpt2arch.model.arch == "gpt2"
    for key in ("schedule", "matrix_lr", "beta1", "weight_decay", "muon_ns", "grad_clip", "warmup_steps"):
        assert getattr(gpt2arch.optim, key) == getattr(modern.optim, key), key
    assert gpt2arch.optim.embedding_lr == modern.optim.head_lr  # a tied table is also the head


def test_a_screened_switch_is_compared_with_the_arm_it_builds_on():
    whole = [ttq.ARMS[n] for n in ("baseline", "modern", "modern+normuon")]
    assert ttq.builds_on(ttq.ARMS["modern+value-embeds"], whole).name == "modern"
    both = ttq.parse_arm("both=--optim.muon_normuon=true --optim.muon_momentum_start=0.85")
    assert ttq.builds_on(both, whole).name == "modern+normuon"  # momentum judged on top of NorMuon, not track 3
    pe = ttq.parse_arm("pe=--optim.muon_ns=polar_express")  # changes a field that track 3 pins
    assert ttq.builds_on(pe, whole).name == "modern"
    pe_on_normuon = ttq.parse_arm("pe=--optim.muon_normuon=true --optim.muon_ns=polar_express")
    assert ttq.builds_on(pe_on_normuon, whole).name == "modern+normuon"
    assert ttq.builds_on(both, whole[:2]).name == "modern"  # without NorMuon's arm: the nearest, track 3
    momentum_both = ttq.parse_arm("both=--optim.muon_normuon=true --optim.muon_momentum_start=0.85 "
                                  "--optim.muon_momentum_warmup_steps=35 --optim.muon_momentum_cooldown_steps=6")
    two = whole + [ttq.ARMS["modern+momentum"]]  # it builds on both of these: the choice is the caller's
    assert ttq.builds_on(momentum_both, two).name == "modern+momentum"  # default: the one with most changes
    assert ttq.builds_on(momentum_both, two, "modern+normuon").name == "modern+normuon"
    with pytest.raises(ttq.UserError, match="--against both=modern-tied"):
        ttq.builds_on(momentum_both, two + [ttq.ARMS["modern-tied"]], "modern-tied")
    with pytest.raises(ttq.UserError, match="--screen modern-gpt2arch.*add that arm"):
        ttq.builds_on(ttq.ARMS["modern-gpt2arch"], whole[1:])  # no arm on its recipe (the baseline's)
    assert ttq.builds_on(ttq.ARMS["modern-gpt2arch"], whole).name == "baseline"  # the quickstart recipe's arm


def test_timing_takes_the_named_arms_screened_ones_too_and_always_the_baseline():
    whole = [ttq.ARMS[n] for n in ("baseline", "modern", "modern+normuon")]
    pe = ttq.parse_arm("pe=--optim.muon_ns=polar_express")
    assert ttq.arms_to_time("", whole, [pe]) == whole  # default: the whole protocol's arms
    assert [a.name for a in ttq.arms_to_time("pe,modern", whole, [pe])] == ["baseline", "modern", "pe"]
    with pytest.raises(ttq.UserError, match="--timing-arms .*nope"):
        ttq.arms_to_time("modern,nope", whole, [pe])


def test_a_run_is_cached_under_what_it_trains(tmp_path):
    """The run's name hashes its resolved config: restating a recipe value or moving the run is the same run,
    editing the recipe (here: a copy with another momentum) is a new one."""
    recipe = RECIPES_DIR / "quickstart-modern.toml"
    edited = tmp_path / "quickstart-modern.toml"
    edited.write_text(recipe.read_text().replace("muon_momentum = 0.95", "muon_momentum = 0.9"))
    digest = ttq.run_digest(load_config("quickstart-modern"))
    assert ttq.run_digest(load_config("quickstart-modern", ["--optim.muon_momentum=0.95"])) == digest
    assert ttq.run_digest(load_config("quickstart-modern", ["--log.out_dir=elsewhere", "--log.run_name=x"])) == digest
    assert ttq.run_digest(load_config(str(edited))) != digest
    assert ttq.run_digest(load_config(str(edited), ["--optim.muon_momentum=0.95"])) == digest


def test_shorter_runs_keep_the_arm_schedule_shape():
    ctx = ttq.Context(ttq.TIERS["tiny"], Path("."), {}, Path("."), 100, 0.1)
    momentum = ttq.ARMS["modern+momentum"]  # 35 warmup and 6 cooldown steps of N = 100
    assert ttq.schedule_overrides(ctx, momentum, 100) == {
        "optim.warmup_steps": 0, "optim.muon_momentum_warmup_steps": 35, "optim.muon_momentum_cooldown_steps": 6}
    assert ttq.schedule_overrides(ctx, momentum, 20) == {
        "optim.warmup_steps": 0, "optim.muon_momentum_warmup_steps": 7, "optim.muon_momentum_cooldown_steps": 1}
    baseline = load_config("quickstart")  # the LR warmup keeps the recipe's fraction of its run
    expected = round(baseline.optim.warmup_steps / baseline.train.max_steps * 50)
    assert ttq.schedule_overrides(ctx, ttq.ARMS["baseline"], 50) == {"optim.warmup_steps": expected}
    given = ttq.parse_arm("w=--optim.warmup_steps=10 --optim.muon_momentum_cooldown_steps=6")  # --arm's strings
    assert ttq.schedule_overrides(ctx, given, 50) == {"optim.warmup_steps": 5, "optim.muon_momentum_cooldown_steps": 3}


def test_arms_are_compared_on_paired_seeds():
    """Two arms whose losses share a large per-seed offset and differ by a constant 0.02: the paired bootstrap's
    interval for the difference is that constant; resampling each arm's seeds alone would span ±0.3."""
    offsets = [0.0, 0.3, -0.3, 0.15, -0.15]

    def runs(shift):
        return {f: [{"steps": int(100 * f), "tokens": int(100 * f), "val": {"prose": {
            "loss": 3 + shift + 0.5 * f ** -0.5 + o, "bpb": 1.0}}} for o in offsets] for f in (1.0, 0.5, 0.25)}

    arms = {"baseline": runs(0.5), "modern": runs(0.0), "other": runs(0.02), "more": runs(0.01)}
    result = ttq.analyse(arms, [1.0, 0.5, 0.25], "prose", 200, np.random.default_rng(0),
                         parents={"other": "modern", "more": "other"})
    lo, hi = result["arms"]["other"]["vs_modern"]["loss_at_n_interval"]
    assert lo == pytest.approx(0.02, abs=1e-9) and hi == pytest.approx(0.02, abs=1e-9)
    lo, hi = result["arms"]["other"]["vs_modern"]["tokens_ratio_near_interval"]
    assert 1 < lo <= hi < 1.2  # worse by a constant: more tokens to the modern recipe's loss at N, in every draw
    assert result["arms"]["other"]["vs_parent"] is None  # it builds on track 3 itself: vs_modern says it
    parent = result["arms"]["more"]["vs_parent"]  # a switch on top of `other`, judged against `other`
    assert parent["against"] == "other"
    assert parent["loss_at_n_interval"] == pytest.approx([-0.01, -0.01], abs=1e-9)
    assert parent["tokens_ratio_near_interval"][1] < 1  # better: fewer tokens to `other`'s loss at N, every draw
    table = ttq.ablation_markdown({"tier": "t", "seeds": [0], "bootstrap": 200, "analysis": {"prose": result},
                                   "valsets": {"prose": {"tokens": 1, "bytes": 1}},
                                   "arms": {n: {"about": n} for n in arms}})
    assert "## Against the arm it builds on" in table and "| more | other | -0.0100 [-0.0100, -0.0100] |" in table


def test_timing_only_trains_nothing_and_its_file_feeds_timing_from(tmp_path, monkeypatch):
    timed = []

    def fake_step_cost(ctx, arms, rounds, steps, compile=False):
        timed.append(([a.name for a in arms], compile))
        return {"ms_per_step": {a.name: 10.0 for a in arms}, "ratios": {a.name: 1.0 for a in arms[1:]},
                "how": "compiled" if compile else "eager"}

    monkeypatch.setattr(ttq, "step_cost", fake_step_cost)
    monkeypatch.setattr(ttq, "run_many", lambda *a, **k: pytest.fail("--timing-only trained"))
    monkeypatch.setattr(sys, "argv", ["time_to_quality.py", "--quick", "--timing-only", "--work", str(tmp_path / "w"),
                                      "--results", str(tmp_path), "--arms", "baseline,modern",
                                      "--arm", "pe=--optim.muon_ns=polar_express", "--screen", "pe",
                                      "--timing-arms", "pe"])
    assert ttq.main() == 0
    assert timed == [(["baseline", "pe"], False), (["baseline", "pe"], True)]  # a screened arm, and the baseline
    earlier = ttq.earlier_step_cost(tmp_path / "step-cost-quick.json", "quick")
    assert set(earlier) == {"eager", "compiled"} and "measured at" in earlier["eager"]["how"]


def test_timing_from_an_earlier_result_is_marked_and_checked(tmp_path):
    earlier = tmp_path / "time-to-quality-tiny.json"
    earlier.write_text(json.dumps({"tier": "tiny", "time": "2026-12-05T03:17:15+00:00", "step_cost": {
        "ms_per_step": {"baseline": 254, "modern": 378}, "ratio": 1.49, "how": "4 rounds"}}))
    cost = ttq.earlier_step_cost(earlier, "tiny")  # an old file's one eager comparison
    assert list(cost) == ["eager"] and cost["eager"]["ratios"] == {"modern": 1.49}
    assert "2026-12-05T03:17:15" in cost["eager"]["how"]
    earlier.write_text(json.dumps({"tier": "tiny", "time": "2026-12-06T00:00:00+00:00", "step_cost": cost}))
    again = ttq.earlier_step_cost(earlier, "tiny")
    assert again["eager"]["ratios"] == {"modern": 1.49} and "2026-12-06" in again["eager"]["how"]
    with pytest.raises(ttq.UserError, match="not a larger-tier result"):
        ttq.earlier_step_cost(earlier, "larger")
    with pytest.raises(ttq.UserError, match="cannot read"):
        ttq.earlier_step_cost(tmp_path / "missing.json", "tiny")


def test_step_cost_times_every_arm_in_reversing_order_and_compiles_when_asked(monkeypatch):
    built, order = [], []

    class FakeTrainer:  # a step of "modern" costs 3 units, of the others 2
        def __init__(self, config):
            built.append(config)
            self.step, self.name, self.parallel = 0, config.log.run_name, type("P", (), {"device": torch.device("cpu")})

        def run(self, until):
            if self.step >= 2:
                order.append(self.name)
            time.sleep((3 if self.name == "modern" else 2) * 0.05 * (until - self.step))
            self.step = until

        def close(self):
            pass

    monkeypatch.setattr("gpt2forge.train.trainer.Trainer", FakeTrainer)
    ctx = ttq.Context(ttq.TIERS["tiny"], Path("."), {}, Path("."), 100, 0.1,
                      {**ttq.TIERS["tiny"].overrides, "model.vocab_size": 2048, "model.vocab_multiple": 1})
    arms = [ttq.ARMS[n] for n in ("baseline", "modern", "modern-tied")]
    cost = ttq.step_cost(ctx, arms, rounds=2, steps=2, compile=True)
    assert all(c.train.compile for c in built) and [c.log.run_name for c in built] == [a.name for a in arms]
    assert order == ["baseline", "modern", "modern-tied", "modern-tied", "modern", "baseline"]
    assert cost["ratios"]["modern"] == pytest.approx(1.5, rel=0.15)
    assert cost["ratios"]["modern-tied"] == pytest.approx(1.0, rel=0.15) and "compiled" in cost["how"]
    built.clear()
    assert "eager" in ttq.step_cost(ctx, arms[:2], rounds=1, steps=1)["how"]
    assert not any(c.train.compile for c in built)
