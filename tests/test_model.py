import math

import pytest
import torch
import torch.nn.functional as F

from gpt2forge.models import IGNORE_INDEX, Runtime, make_config
from gpt2forge.models.gpt2 import GPT, GPTConfig


@pytest.mark.parametrize(
    "preset, expected",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)],
)
def test_preset_parameter_counts(preset, expected):
    with torch.device("meta"):
        model = GPT(make_config("gpt2", preset, vocab_multiple=1))
    assert model.num_params() == expected  # tied lm_head counted once


def test_padded_vocab_adds_only_embedding_rows():
    with torch.device("meta"):
        model = GPT(make_config("gpt2", "gpt2", vocab_multiple=128))
    assert model.config.padded_vocab_size == 50304
    assert model.num_params() == 124_439_808 + (50304 - 50257) * 768


def test_unknown_preset_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="model.preset 'gpt5' is unknown"):
        make_config("gpt2", "gpt5")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="attention"):
        Runtime(attention="flash")


def test_gpt2_initialisation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=128, vocab_size=4096))
    assert model.lm_head.weight is model.transformer.wte.weight
    h0 = model.transformer.h[0]
    assert h0.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert h0.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert h0.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert h0.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
    assert torch.all(h0.ln_1.weight == 1)


def test_loss_ignores_padded_vocab_and_ignore_index():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=100, vocab_multiple=64))
    with torch.no_grad():  # make the padding rows loud: a loss that saw them would change a lot
        model.transformer.wte.weight[100:] = 5.0
    idx = torch.randint(0, 100, (2, 8))
    targets = torch.randint(0, 100, (2, 8))
    targets[0, :3] = IGNORE_INDEX
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 8, 100)
    keep = targets != IGNORE_INDEX
    manual = -F.log_softmax(logits, dim=-1)[keep].gather(-1, targets[keep][:, None]).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)


def test_manual_attention_matches_sdpa(tiny_config):
    torch.manual_seed(0)
    sdpa = GPT(tiny_config).eval()
    manual = GPT(tiny_config, Runtime(attention="manual")).eval()
    manual.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 50257, (2, 33))
    torch.testing.assert_close(sdpa(idx)[0], manual(idx)[0], atol=1e-5, rtol=1e-5)


def test_context_overflow_is_refused(tiny_model):
    with pytest.raises(ValueError, match="exceeds the context length 64"):
        tiny_model(torch.zeros(1, 65, dtype=torch.long))


def test_causal_future_tokens_do_not_change_past_logits(tiny_model):
    idx = torch.randint(0, 50257, (1, 20))
    changed = idx.clone()
    changed[0, 10:] = torch.randint(0, 50257, (10,))
    torch.testing.assert_close(tiny_model(idx)[0][:, :10], tiny_model(changed)[0][:, :10])


def test_flops_per_token_matches_reference_for_gpt2():
    with torch.device("meta"):
        model = GPT(make_config("gpt2", "gpt2", vocab_multiple=128))
    # REFERENCE.md: 6N + 12·L·H·Q·T ≈ 742M + 113M = 855 MFLOP at T=1024, V=50304
    assert model.flops_per_token(1024) == pytest.approx(855e6, rel=0.01)
