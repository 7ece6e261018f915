import json

import pytest
import torch
import transformers

from gpt2forge.errors import UserError
from gpt2forge.hf import export_hf
from gpt2forge.models import Runtime
from gpt2forge.models.gpt2 import GPT, GPTConfig
from gpt2forge.tokenizer import get_tokenizer
from gpt2forge.weights import load_model, save_model


def hf_logits(path, idx):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(idx).logits


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_import_from_hf_matches_logits(hf_model_dir, attention):
    ours = load_model(hf_model_dir, runtime=Runtime(attention=attention))
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf_logits(hf_model_dir, idx), atol=1e-5, rtol=0)


def test_export_to_hf_matches_logits_and_tokenizer(tmp_path):
    torch.manual_seed(3)
    ours = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=48)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    out = export_hf(ours, tmp_path / "exported")
    idx = torch.randint(0, 50257, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(out, idx), ours(idx)[0], atol=1e-5, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Hello world, this is GPT-2. Unicode too: naïve 東京 😀"
    assert hf_tok(text).input_ids == get_tokenizer().encode(text)
    assert hf_tok.eos_token_id == 50256
    # and back again: the exported directory imports to the same model
    back = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], ours(idx)[0], atol=0, rtol=0)


def test_padded_vocab_model_exports_at_50257(tmp_path):
    torch.manual_seed(4)
    ours = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_multiple=128)).eval()
    assert ours.transformer.wte.weight.shape[0] == 50304
    out = export_hf(ours, tmp_path / "exported")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 50257
    idx = torch.randint(0, 50257, (1, 32))
    logits = hf_logits(out, idx)
    assert logits.shape[-1] == 50257
    with torch.no_grad():
        torch.testing.assert_close(logits, ours(idx)[0], atol=1e-5, rtol=0)


def test_our_checkpoint_round_trip(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config == tiny_model.config
    for (k, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_bad_model_directories_get_clear_messages(tmp_path, hf_model_dir):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="neither a gpt2forge checkpoint"):
        load_model(empty)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text((hf_model_dir / "config.json").read_text())
    with pytest.raises(UserError, match="no model.safetensors"):
        load_model(incomplete)
    wrong = tmp_path / "llama"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="only 'gpt2'"):
        load_model(wrong)
    relu = tmp_path / "relu"
    relu.mkdir()
    config = json.loads((hf_model_dir / "config.json").read_text())
    (relu / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(UserError, match="activation_function='relu'"):
        load_model(relu)


def test_weights_of_another_shape_are_refused(tmp_path, hf_model_dir):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    config = json.loads((hf_model_dir / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    (wrong / "model.safetensors").symlink_to(hf_model_dir / "model.safetensors")
    with pytest.raises(UserError, match="do not fit a 3-layer gpt2 model: missing"):
        load_model(wrong)


def test_export_refuses_a_non_empty_directory(tmp_path, tiny_model):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        export_hf(tiny_model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
