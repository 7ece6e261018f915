"""The chunked cross-entropy equals the reference one (loss and gradients, to fp32 rounding), never lets a
padded column into the softmax, and needs no full fp32 copy of the logits."""

import pytest
import torch

from gpt2forge.models import IGNORE_INDEX, Runtime, build_model, make_config
from gpt2forge.models import loss as lm


def both(logits, targets, vocab, cap=0.0):
    """(loss, grad) of the reference (slice, cap, fp32 copy) and of the chunked implementation."""
    out = []
    for kind in ("reference", "chunked"):
        x = logits.detach().clone().requires_grad_()
        if kind == "reference":
            value = lm.cross_entropy(lm.softcap(x[..., :vocab], cap), targets)
        else:
            value = lm.chunked_cross_entropy(x, targets, vocab, cap)
        value.backward()
        out.append((value, x.grad))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap", [0.0, 15.0])
def test_chunked_equals_reference_across_chunks(monkeypatch, dtype, cap):
    monkeypatch.setattr(lm, "CHUNK_BYTES", 7 * 4 * 128)  # 7 rows a chunk, 50 rows: eight chunks, the last short
    torch.manual_seed(0)
    logits = (torch.randn(5, 10, 128) * 6).to(dtype)
    targets = torch.randint(0, 100, (5, 10))
    targets[0, :4] = IGNORE_INDEX
    (ref, ref_grad), (chunked, grad) = both(logits, targets, vocab=100, cap=cap)
    assert chunked.item() == pytest.approx(ref.item(), rel=1e-6)
    assert grad.dtype == dtype and torch.allclose(grad.float(), ref_grad.float(), rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(grad[..., 100:]) == 0  # padded columns: no gradient
    assert torch.count_nonzero(grad[0, :4]) == 0  # ignored targets: no gradient


def test_padded_columns_never_reach_the_softmax():
    logits = torch.zeros(4, 64)
    logits[:, 50:] = 1e4  # loud padding: a softmax that saw it would put all mass there
    targets = torch.tensor([0, 1, 2, 3])
    assert lm.chunked_cross_entropy(logits, targets, 50).item() == pytest.approx(torch.log(torch.tensor(50.0)).item())


@pytest.mark.parametrize("arch, fields", [("gpt2", {}), ("modern", {"zero_init": False})])
def test_models_give_the_same_loss_and_gradients_with_either_loss(arch, fields):
    config = make_config(arch, "tiny", n_layer=2, vocab_size=300, vocab_multiple=64, **fields)
    torch.manual_seed(0)
    reference = build_model(config, Runtime(loss="reference"))
    chunked = build_model(config, Runtime(loss="chunked"))
    chunked.load_state_dict(reference.state_dict())
    idx, targets = torch.randint(0, 300, (2, 2, 33))
    logits, ref_loss = reference(idx, targets)
    none, loss = chunked(idx, targets)
    assert none is None and logits.shape == (2, 33, 300)  # the chunked loss materialises no logits
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    ref_loss.backward()
    loss.backward()
    for (name, a), b in zip(reference.named_parameters(), chunked.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name
    assert torch.equal(chunked(idx)[0], logits)  # without targets, logits as always

