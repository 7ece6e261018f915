"""The chunked cross-entropy equals the reference one (loss and gradients, to fp32 rounding), eager and compiled,
for both soft-cap forms; never lets a padded column into the softmax; is one op each way under torch.compile; and
its eager tanh path is bit-identical to the loss before the custom op."""

import subprocess
import types
from pathlib import Path

import pytest
import torch

from gpt2forge.models import IGNORE_INDEX, Runtime, build_model, make_config
from gpt2forge.models import loss as lm


def both(logits, targets, vocab, cap=0.0, form="tanh"):
    """(loss, grad) of the reference (slice, cap, fp32 copy) and of the chunked implementation."""
    out = []
    for kind in ("reference", "chunked"):
        x = logits.detach().clone().requires_grad_()
        if kind == "reference":
            value = lm.cross_entropy(lm.softcap(x[..., :vocab], cap, form), targets)
        else:
            value = lm.chunked_cross_entropy(x, targets, vocab, cap, form)
        value.backward()
        out.append((value, x.grad))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap, form", [(0.0, "tanh"), (15.0, "tanh"), (15.0, "algebraic")])
def test_chunked_equals_reference_across_chunks(monkeypatch, dtype, cap, form):
    monkeypatch.setattr(lm, "CHUNK_BYTES", 7 * 4 * 128)  # 7 rows a chunk, 50 rows: eight chunks, the last short
    torch.manual_seed(0)
    logits = (torch.randn(5, 10, 128) * 6).to(dtype)
    targets = torch.randint(0, 100, (5, 10))
    targets[0, :4] = IGNORE_INDEX
    (ref, ref_grad), (chunked, grad) = both(logits, targets, vocab=100, cap=cap, form=form)
    assert chunked.item() == pytest.approx(ref.item(), rel=1e-6)
    assert grad.dtype == dtype and torch.allclose(grad.float(), ref_grad.float(), rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(grad[..., 100:]) == 0  # padded columns: no gradient
    assert torch.count_nonzero(grad[0, :4]) == 0  # ignored targets: no gradient


def test_eager_cpu_chunks_are_cache_sized_and_change_no_gradient(monkeypatch):
    """Eager on a CPU the chunks are cut to ``CPU_EAGER_CHUNK_BYTES`` (compiled callers keep ``CHUNK_BYTES``);
    every row's gradient is computed on its own, so it is bit for bit that of one whole-batch chunk."""
    logits = torch.empty(1024, 4096)
    assert lm.chunk_rows(logits) == lm.CPU_EAGER_CHUNK_BYTES // (4 * 4096) < 1024
    assert lm.chunk_rows(logits, fused=True) == lm.CHUNK_BYTES // (4 * 4096)
    torch.manual_seed(4)
    logits = torch.randn(3, 50, 128) * 6
    targets = torch.randint(0, 100, (3, 50))
    targets[0, :5] = IGNORE_INDEX
    out = []
    for cpu_bytes in (lm.CHUNK_BYTES, 7 * 4 * 128):  # one chunk of 150 rows; 22 chunks of 7 rows
        monkeypatch.setattr(lm, "CPU_EAGER_CHUNK_BYTES", cpu_bytes)
        x = logits.clone().requires_grad_()
        value = lm.chunked_cross_entropy(x, targets, 100, 15.0, "algebraic")
        value.backward()
        out.append((value, x.grad))
    (whole, whole_grad), (chunked, grad) = out
    assert torch.equal(grad, whole_grad)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)  # the per-chunk sums add in another order


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



def plain_softcap(x, cap, form):
    """The published formulas, written plainly (autograd differentiates them)."""
    return cap * torch.tanh(x / cap) if form == "tanh" else cap * x / torch.sqrt(x * x + cap * cap)


@pytest.mark.parametrize("form", lm.SOFTCAP_FORMS)
def test_softcap_forms_match_their_formulas(form):
    torch.manual_seed(0)
    x = (torch.randn(6, 50) * 30).requires_grad_()
    plain = x.detach().clone().requires_grad_()
    weights = torch.randn(6, 50)
    (lm.softcap(x, 15.0, form) * weights).sum().backward()
    (plain_softcap(plain, 15.0, form) * weights).sum().backward()
    assert torch.allclose(lm.softcap(x, 15.0, form), plain_softcap(plain, 15.0, form), rtol=1e-6, atol=1e-6)
    assert torch.allclose(x.grad, plain.grad, rtol=1e-5, atol=1e-7)
    assert lm.softcap(x, 0.0, form) is x  # cap 0: off
    if form == "algebraic":  # not tanh under another name: the two differ well inside the cap
        assert not torch.allclose(lm.softcap(x, 15.0, form), lm.softcap(x, 15.0, "tanh"), atol=1e-2)


def test_tanh_softcap_is_the_formula_it_always_was():
    x = torch.randn(4, 33, dtype=torch.bfloat16) * 20
    assert torch.equal(lm.softcap(x, 15.0), 15.0 * torch.tanh(x.float() / 15.0))


@pytest.mark.parametrize("form", lm.SOFTCAP_FORMS)
def test_chunked_loss_matches_autograd_of_the_plain_formula(monkeypatch, form):
    """Value and gradient of the chunked loss (the cap's derivative computed by hand, in place) against autograd
    through the plain formula and F.cross_entropy, fp32."""
    monkeypatch.setattr(lm, "CHUNK_BYTES", 5 * 4 * 96)  # 5 rows a chunk, 24 rows: five chunks
    torch.manual_seed(1)
    logits = torch.randn(24, 96) * 25
    targets = torch.randint(0, 80, (24,))
    targets[3] = IGNORE_INDEX
    plain = logits.clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(plain_softcap(plain[:, :80], 15.0, form), targets,
                                                 ignore_index=IGNORE_INDEX)
    expected.backward()
    x = logits.clone().requires_grad_()
    value = lm.chunked_cross_entropy(x, targets, 80, 15.0, form)
    value.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(x.grad, plain.grad, rtol=1e-5, atol=1e-8)


def test_unknown_softcap_form_is_refused():
    with pytest.raises(ValueError, match="soft-cap form"):
        lm.chunked_cross_entropy(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long), 8, 15.0, "cubic")
    with pytest.raises(ValueError, match="soft-cap form"):
        lm.softcap(torch.zeros(2, 8), 15.0, "cubic")


BASE = "621a58c"  # the loss before the soft-cap forms and the custom op


def base_loss_module():
    """models/loss.py as of BASE, from git (skipped outside a checkout that has that commit)."""
    try:
        source = subprocess.run(["git", "show", f"{BASE}:src/gpt2forge/models/loss.py"], capture_output=True,
                                text=True, check=True, cwd=Path(__file__).parent).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git history without {BASE}")
    module = types.ModuleType("gpt2forge.models._loss_base")
    module.__package__ = "gpt2forge.models"
    exec(compile(source, f"{BASE}:loss.py", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap", [0.0, 15.0])
def test_tanh_path_is_bit_identical_to_before(monkeypatch, dtype, cap):
    base = base_loss_module()
    for module in (lm, base):
        monkeypatch.setattr(module, "CHUNK_BYTES", 7 * 4 * 128)
    torch.manual_seed(2)
    logits = (torch.randn(50, 128) * 6).to(dtype)
    targets = torch.randint(0, 100, (50,))
    targets[:3] = IGNORE_INDEX
    out = []
    for loss in (lm.chunked_cross_entropy, base.chunked_cross_entropy):
        x = logits.clone().requires_grad_()
        value = loss(x, targets, 100, cap)
        value.backward()
        out.append((value, x.grad))
    (new, new_grad), (old, old_grad) = out
    assert torch.equal(new, old) and torch.equal(new_grad, old_grad)
    x = logits[:, :100]
    assert torch.equal(lm.softcap(x, cap), base.softcap(x, cap))


def test_compiled_callers_get_fused_chunks_with_the_same_numbers(monkeypatch):
    """Under torch.compile the op runs compiled per-chunk functions (the one-hot subtraction fused into one pass):
    loss and gradient still equal the reference's to fp32 rounding (bf16 gradients: to one bf16 step)."""
    monkeypatch.setattr(lm, "CHUNK_BYTES", 7 * 4 * 128)
    torch.manual_seed(3)
    logits = torch.randn(50, 128) * 6
    targets = torch.randint(0, 100, (50,))
    targets[:3] = IGNORE_INDEX
    compiled = torch.compile(lm.chunked_cross_entropy, fullgraph=True)
    for dtype, cap, form in [(torch.float32, 0.0, "tanh"), (torch.float32, 15.0, "tanh"),
                             (torch.float32, 15.0, "algebraic"), (torch.bfloat16, 15.0, "tanh")]:
        (ref, ref_grad), _ = both(logits.to(dtype), targets, 100, cap, form)
        x = logits.to(dtype).clone().requires_grad_()
        value = compiled(x, targets, 100, cap, form)
        value.backward()
        assert value.item() == pytest.approx(ref.item(), rel=1e-6), (dtype, cap, form)
        rtol = 1e-4 if dtype == torch.float32 else 2**-7  # bf16: the fused fp32 sum may round to the next bf16
        assert x.grad.dtype == dtype and torch.allclose(x.grad.float(), ref_grad.float(), rtol=rtol, atol=1e-6)
        assert torch.count_nonzero(x.grad[:3]) == 0 and torch.count_nonzero(x.grad[:, 100:]) == 0


def test_compiled_graph_is_one_op_whatever_the_number_of_chunks(monkeypatch):
    """torch.compile sees the forward and the backward as one custom op each: the traced graphs are the same few
    nodes for 1, 8 or 50 chunks (the chunk loop used to be unrolled into them: ~30 nodes per chunk)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def graphs(rows_per_chunk):
        monkeypatch.setattr(lm, "CHUNK_BYTES", rows_per_chunk * 4 * 128)
        seen = []

        def record(gm, example_inputs):
            seen.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
            return make_boxed_func(gm.forward)

        torch._dynamo.reset()
        x = torch.empty(50, 128, device="meta", requires_grad=True)  # runs the ops' fake impls only
        backend = aot_autograd(fw_compiler=record, bw_compiler=record)
        torch.compile(lm.chunked_cross_entropy, backend=backend, fullgraph=True)(
            x, torch.zeros(50, dtype=torch.long, device="meta"), 100, 15.0).backward()
        return seen

    forward, backward = graphs(50)
    assert [op for op in forward if "gpt2forge" in op] == ["gpt2forge.chunked_cross_entropy.default"]
    assert [op for op in backward if "gpt2forge" in op] == ["gpt2forge.chunked_cross_entropy_backward.default"]
    assert len(forward) + len(backward) < 10
    assert graphs(7) == graphs(1) == [forward, backward]
