"""Hugging Face export of ``modern`` as remote code: transformers loads it with trust_remote_code, computes our
logits and greedy continuation, lm-eval's hf backend scores it as our own lm-eval class does, convert reads it
back; the model card states recipe, data, steps and scores; an unknown config field is refused."""

import dataclasses
import json

import pytest
import torch
import transformers

from gpt2forge.commands import main
from gpt2forge.errors import UserError
from gpt2forge.hf import export_hf, remote_fields
from gpt2forge.models import build_model, make_config
from gpt2forge.models.modern import ModernConfig
from gpt2forge.sample import generate
from gpt2forge.weights import load_model, save_model


def modern_model(seed=0, **fields):
    """A small modern model with every weight random (a fresh one starts with zeroed projections and head)."""
    config = make_config("modern", "tiny", n_layer=2, n_head=2, n_embd=64, block_size=64, **fields)
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    return model


def load_remote(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


@pytest.mark.parametrize("fields", [
    {},  # track 3's defaults: untied, half rotary, QK-norm, ReLU², soft cap 15, biases
    {"tie_embeddings": True, "mlp": "gelu", "rope_fraction": 1.0, "qk_norm": False, "embed_norm": False,
     "logit_softcap": 0.0, "bias": False, "attn_scale": 0.0},  # every switch the other way
    {"logit_softcap_form": "tanh", "residual_scalars": True, "value_embeds": 1},  # and the next tier's on
])
def test_modern_export_loads_in_transformers_with_our_logits_and_greedy_continuation(tmp_path, fields):
    ours = modern_model(**fields)
    out = export_hf(ours, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt2forge.Gpt2forgeModernForCausalLM"
    assert config["vocab_size"] == 50257 and {f: config[f] for f in fields} == fields
    hf = load_remote(out)
    idx = torch.randint(0, 50257, (3, 64))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-5, rtol=0)
        greedy_hf = hf.generate(idx[:1, :12], max_new_tokens=30, do_sample=False, pad_token_id=50256)
        greedy_ours = generate(ours, idx[:1, :12], 30, temperature=0, stop_token=None)
    assert greedy_hf.tolist() == greedy_ours[:, : greedy_hf.size(1)].tolist() and greedy_hf.size(1) > 12
    # a left-padded row (attention_mask, position_ids as generate builds them) scores its real tokens the same
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        padded = hf(idx[:2, :20], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(padded[1, 6:], ours(idx[1:2, 6:20])[0][0], atol=1e-5, rtol=0)
    # and convert reads it back as our model, exactly
    back = load_model(out)
    assert back.config.to_dict() == {**ours.config.to_dict(), "vocab_multiple": 1}
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], ours(idx)[0], atol=0, rtol=0)


def test_export_command_writes_a_model_card_and_convert_reads_the_export_back(tmp_path, capsys):
    ours = modern_model(seed=3)
    ckpt = tmp_path / "run" / "step-000120"
    ckpt.mkdir(parents=True)
    save_model(ours, ckpt)
    (ckpt / "train_state.json").write_text(json.dumps({"step": 120, "tokens": 245760}))
    (ckpt / "config.toml").write_text('name = "quickstart-modern"\n\n[data]\ndir = "data/embedded"\n')
    (ckpt / "eval.json").write_text(json.dumps({"val": {"loss": 5.25, "bpb": 1.5}, "tasks": {"core": 0.01, "tasks": {
        "piqa": {"metric": "acc_norm", "accuracy": 0.55}}}}))
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    for fact in ("quickstart-modern", "data/embedded", "Steps: 120 (245,760 tokens)", "val_loss: 5.2500",
                 "val_bpb: 1.5000", "core: 0.0100", "piqa_acc_norm: 0.5500", "trust_remote_code=True",
                 "No `transformers` class computes it exactly"):
        assert fact in card, fact
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "README.md", "config.json", "configuration_gpt2forge.py", "generation_config.json", "merges.txt",
        "model.safetensors", "modeling_gpt2forge.py", "special_tokens_map.json", "tokenizer_config.json",
        "vocab.json"]
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("Hello world").input_ids == [15496, 995]
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    idx = torch.randint(0, 50257, (1, 30))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], ours(idx)[0])


def test_gpt2_stays_gpt2lmheadmodel_with_a_card(tmp_path, tiny_model):
    out = export_hf(tiny_model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and "auto_map" not in config
    assert "GPT2LMHeadModel" in (out / "README.md").read_text()
    assert not (out / "modeling_gpt2forge.py").exists()


def test_a_config_field_the_modeling_file_does_not_know_is_refused(tmp_path):
    @dataclasses.dataclass
    class WithSkips(ModernConfig):
        unet_skips: bool = False

    model = modern_model()
    model.config = WithSkips(**{f: getattr(model.config, f) for f in ModernConfig.field_names()})
    with pytest.raises(UserError, match=r"model.unet_skips, which the Hugging Face modeling file .* does not "
                                        r"implement"):
        export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert set(remote_fields()) == set(ModernConfig.field_names()) - {"vocab_multiple"}  # today: all of them


def test_an_export_older_than_the_optional_fields_reads_as_what_it_computed():
    from gpt2forge.hf import config_from_hf, modern_hf_config

    config = modern_hf_config(modern_model().config)
    for field in ("logit_softcap_form", "residual_scalars", "value_embeds"):
        del config[field]
    old = config_from_hf(config, "old export")
    assert (old.logit_softcap_form, old.residual_scalars, old.value_embeds) == ("tanh", False, 0)
    del config["n_layer"]
    with pytest.raises(UserError, match="old export: config.json lacks 'n_layer'"):
        config_from_hf(config, "old export")


def test_lm_evals_hf_backend_on_the_modern_export_equals_our_class_on_the_checkpoint(tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from test_harness import KINDS, ROWS, TASK, per_doc

    import gpt2forge.eval.harness  # noqa: F401 -- registers "gpt2forge"

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_mc.yaml").write_text(TASK.format(name="local_mc", data=tmp_path / "rows.jsonl")
                                                      + KINDS["local_mc"].format())
    ours = modern_model(seed=5)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_model(ours, ckpt)
    out = export_hf(ours, tmp_path / "hf")
    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},trust_remote_code=True,device=cpu,"
                                                           "dtype=float32", tasks=["local_mc"], task_manager=manager)
    mine = lm_eval.simple_evaluate(model="gpt2forge", model_args=f"pretrained={ckpt}", tasks=["local_mc"],
                                   task_manager=manager)
    for doc_a, doc_b in zip(per_doc(mine, "local_mc"), per_doc(theirs, "local_mc")):
        for (a,), (b,) in zip(doc_a, doc_b):
            assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
    assert mine["results"]["local_mc"] == pytest.approx(theirs["results"]["local_mc"])
