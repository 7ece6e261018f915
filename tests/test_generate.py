import pytest
import torch

from gpt2forge.models import Runtime
from gpt2forge.models.gpt2 import GPT, GPTConfig
from gpt2forge.sample import generate, sample_next, stream
from gpt2forge.tokenizer import EOT_TOKEN


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_greedy_with_kv_cache_equals_without(attention):
    torch.manual_seed(0)
    # float64 so that tiny rounding differences between cached and full passes cannot flip an argmax
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=500), Runtime(attention=attention))
    model = model.double().eval()
    prompt = torch.randint(0, 500, (2, 7))
    # 60 new tokens: the sequence outgrows the 32-token context, so the sliding window is exercised too
    with_cache = generate(model, prompt, 60, temperature=0, stop_token=None)
    without = generate(model, prompt, 60, temperature=0, stop_token=None, use_cache=False)
    assert with_cache.shape == (2, 67)
    assert torch.equal(with_cache, without)


def test_sampling_is_reproducible_with_a_seed(tiny_model):
    prompt = torch.randint(0, 50257, (3, 4))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(tiny_model, prompt, 20, temperature=1.0, top_k=50, generator=g, stop_token=None)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {1, 2}
    assert set(sample_next(logits, top_k=1, generator=g).tolist()) == {1}
    # p(1) ≈ 0.47, p(2) ≈ 0.43: top_p=0.4 keeps token 1 alone, top_p=0.8 keeps 1 and 2
    assert set(sample_next(logits, top_p=0.4, generator=g).tolist()) == {1}
    assert set(sample_next(logits, top_p=0.8, generator=g).tolist()) == {1, 2}
    assert sample_next(logits[:1], temperature=0).item() == 1


def test_generation_stops_at_end_of_text():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16)).eval()
    with torch.no_grad():  # final hidden state = all ones, and only <|endoftext|>'s (tied) row is large
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[EOT_TOKEN] = 100.0
    steps = list(stream(model, torch.zeros(1, 3, dtype=torch.long), 10, temperature=0))
    assert [s.item() for s in steps] == [EOT_TOKEN]
