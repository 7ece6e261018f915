"""Muon: Newton–Schulz orthogonalises, the optimizer equals a naive reference and torch.optim.Muon, resumes bit for
bit, takes its schedule from the param groups, and shares the work across ranks with bit-identical results."""

import io
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from gpt2forge.optim.muon import NS_VARIANTS, Muon, newton_schulz

# Written out here, so that a changed constant in muon.py fails the tests.
QUINTIC = (3.4445, -4.7750, 2.0315)
TRACK3 = (2.0, -1.5, 0.5)  # track 3's train_gpt_simple.py, 12 times
POLAR_EXPRESS = [  # modded-nanogpt's train_gpt.py (f411b3d3): 5 iterations, safety factor 2e-2
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]

SRC = str(Path(__file__).resolve().parents[1] / "src")


def toy_model(seed: int = 0) -> nn.Module:
    """Two bias-free layers: a tall (32×8) and a wide (4×32) weight, so both orientations and LR scales occur."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32, bias=False), nn.Tanh(), nn.Linear(32, 4, bias=False))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 8, generator=g)
    return x, torch.sin(x[:, :4]) + 0.1 * torch.randn(16, 4, generator=g)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    opt.zero_grad(set_to_none=True)
    x, y = batch(step)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


# 1. Newton–Schulz

@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_newton_schulz_orthogonalises_and_keeps_singular_vectors(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    O = newton_schulz(G)
    assert O.shape == G.shape and O.dtype == G.dtype and O.is_contiguous()
    s = torch.linalg.svdvals(O)
    assert 0.6 < s.min() and s.max() < 1.25, s  # the quintic's band is about [0.68, 1.13]
    assert s.max() - s.min() > 0.1  # deliberately non-convergent: not the exact polar factor
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    assert torch.nn.functional.cosine_similarity(O.flatten(), polar.flatten(), dim=0) > 0.98
    # Same singular vectors: Uᵀ O V is diagonal (O = U p(S) Vᵀ).
    core = U.T @ O @ Vh.T
    assert (core - torch.diag(torch.diagonal(core))).norm() < 1e-3 * core.norm()


def test_newton_schulz_applies_the_quintic_to_each_singular_value():
    """O = U p⁵(S/‖G‖_F) Vᵀ with p(s) = as + bs³ + cs⁵: pins the coefficients, the step count and the scaling."""
    a, b, c = QUINTIC
    torch.manual_seed(0)
    G = torch.randn(40, 24, dtype=torch.float64)
    s = torch.linalg.svdvals(G) / G.norm()
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    s = s.sort(descending=True).values  # p⁵ is not monotonic
    torch.testing.assert_close(torch.linalg.svdvals(newton_schulz(G, dtype=torch.float64)), s, atol=1e-6, rtol=0)
    assert not torch.allclose(torch.linalg.svdvals(newton_schulz(G, steps=4, dtype=torch.float64)), s, atol=1e-3)


@pytest.mark.parametrize("variant, triples, start, band", [
    ("track3", [TRACK3] * 12, lambda s, norm: s / (norm + 1e-7), (1 - 1e-5, 1 + 1e-5)),  # converges
    ("polar_express", POLAR_EXPRESS, lambda s, norm: s / (1.02 * norm + 1e-6), (0.85, 1.15)),
    ("jordan5", [QUINTIC] * 5, lambda s, norm: s / (norm + 1e-7), (0.68, 1.21)),
])
def test_newton_schulz_variants_apply_their_polynomials(variant, triples, start, band):
    """Each variant maps the singular values s/‖G‖_F through its own sequence of quintics, from its own start
    (Polar Express: divided by 1.02·‖G‖_F + 1e-6); singular values above ~1e-3 of the norm land in its band."""
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(40, 24, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))
    s0 = torch.logspace(-2.5, 0, 24, dtype=torch.float64)
    G = U @ torch.diag(s0) @ V.T
    s = start(s0, G.norm())
    for a, b, c in triples:
        s = a * s + b * s**3 + c * s**5
    assert band[0] < s.min() and s.max() < band[1]
    torch.testing.assert_close(torch.linalg.svdvals(newton_schulz(G, dtype=torch.float64, variant=variant)),
                               s.sort(descending=True).values, atol=1e-9, rtol=0)
    assert len(NS_VARIANTS[variant].schedule(None)) == len(triples)


def test_newton_schulz_step_counts():
    assert NS_VARIANTS["track3"].schedule(3) == (TRACK3,) * 3  # a constant triple repeats for any count
    assert NS_VARIANTS["polar_express"].schedule(2) == tuple(POLAR_EXPRESS[:2])
    with pytest.raises(ValueError, match="5 per-iteration triples; 6 steps"):
        Muon([torch.zeros(4, 4, requires_grad=True)], ns="polar_express", ns_steps=6)
    with pytest.raises(ValueError, match="unknown Newton–Schulz variant 'cubic'"):
        Muon([torch.zeros(4, 4, requires_grad=True)], ns="cubic")


def test_a_scaled_guard_makes_muon_blind_to_the_loss_scale():
    """A loss summed over N tokens has N× the gradients of the mean: Muon with the guard divided by N on the mean's
    gradients moves the weights as Muon with the guard on the sum's (what the track-3 recipe relies on). N a power
    of two: every scaling is exact, so the two are bit-identical."""
    torch.manual_seed(0)
    N = 1024
    means = [torch.randn(4, 24, 16) * 1e-11 for _ in range(3)]  # tiny gradients, where the guard matters
    finals = []
    for scale, eps in ((1.0, 1e-7 / N), (float(N), 1e-7), (1.0, 1e-7)):
        p = torch.ones(24, 16, requires_grad=True)
        opt = Muon([p], lr=0.1, ns="track3", ns_eps=eps)
        for grads in means:
            for g in grads:
                p.grad = g * scale
                opt.step()
        finals.append(p.detach().clone())
    assert torch.equal(finals[0], finals[1])
    assert (finals[2] - finals[1]).abs().max() > 1e-3  # the unscaled guard on the mean does differ


def test_newton_schulz_batched_bf16_and_zero_input():
    torch.manual_seed(0)
    G = torch.randn(3, 24, 40)
    O = newton_schulz(G)
    for i in range(3):
        torch.testing.assert_close(O[i], newton_schulz(G[i]), atol=1e-5, rtol=0)
    low = newton_schulz(G[0], dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    assert (low - O[0]).norm() < 0.05 * O[0].norm()  # bf16-level agreement
    assert torch.equal(newton_schulz(torch.zeros(8, 4)), torch.zeros(8, 4))  # eps: no NaN for a zero gradient


# 2. A naive reference

def naive_muon(params, grads, bufs, lr, mu, wd, nesterov, steps=5, moments=None, beta2=0.95, cautious=False):
    """Muon written out in textbook arithmetic (EMA momentum, Nesterov blend, NS polynomial a·X + b·AX + c·A²X).
    ``moments`` (one [rows] tensor per param): NorMuon as the paper states it, row by row; ``cautious``: decay
    only the entries where the update and the weight have the same sign."""
    a, b, c = QUINTIC
    for i, (p, g, buf) in enumerate(zip(params, grads, bufs)):
        buf.copy_(mu * buf + (1 - mu) * g)
        m = (1 - mu) * g + mu * buf if nesterov else buf
        rows, cols = m.shape
        X = m.T if rows > cols else m
        X = X / (torch.sqrt((X * X).sum()) + 1e-7)
        for _ in range(steps):
            A = X @ X.T
            X = a * X + b * (A @ X) + c * (A @ (A @ X))
        O = X.T if rows > cols else X
        if moments is not None:
            v = moments[i]
            v.copy_(beta2 * v + (1 - beta2) * torch.stack([(row * row).sum() / cols for row in O]))
            N = torch.stack([row / max(math.sqrt(float(v[r])), 1e-5) for r, row in enumerate(O)])
            O = N * torch.sqrt((O * O).sum() / (N * N).sum())
        keep = (O * p >= 0) if cautious else torch.ones_like(p, dtype=torch.bool)
        p.copy_(torch.where(keep, p * (1 - lr * wd), p) - lr * math.sqrt(max(1, rows / cols)) * O)


def train_beside_naive(model, opt, ref, lr, mu, wd, nesterov, **naive) -> None:
    """10 steps of ``opt`` on ``model`` and of ``naive_muon`` on ``ref``, on the same batches."""
    bufs = [torch.zeros_like(p) for p in ref.parameters()]
    for step in range(10):
        train_step(model, opt, step)
        for p in ref.parameters():
            p.grad = None
        x, y = batch(step)
        nn.functional.mse_loss(ref(x), y).backward()
        with torch.no_grad():
            naive_muon(list(ref.parameters()), [p.grad for p in ref.parameters()], bufs, lr, mu, wd, nesterov, **naive)


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_naive_reference(nesterov):
    """Equal to 1e-6, not bit for bit: the reference uses its own arithmetic (μB + (1−μ)g rather than lerp, the
    polynomial unfused and associated differently), so rounding differs by ulps (about 2e-7 after 10 steps)."""
    lr, mu, wd = 0.02, 0.9, 0.1
    model, ref = toy_model(), toy_model()
    opt = Muon(model.parameters(), lr=lr, momentum=mu, weight_decay=wd, nesterov=nesterov)
    train_beside_naive(model, opt, ref, lr, mu, wd, nesterov)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert not torch.equal(model[0].weight, toy_model()[0].weight)


@pytest.mark.parametrize("normuon, cautious", [(True, False), (False, True), (True, True)])
def test_normuon_and_cautious_decay_match_the_naive_reference(normuon, cautious):
    lr, mu, wd, beta2 = 0.02, 0.9, 0.5, 0.9
    model, ref = toy_model(), toy_model()
    opt = Muon(model.parameters(), lr=lr, momentum=mu, weight_decay=wd, normuon=normuon, beta2=beta2,
               cautious_wd=cautious)
    moments = [torch.zeros(p.size(0)) for p in ref.parameters()] if normuon else None
    train_beside_naive(model, opt, ref, lr, mu, wd, True, moments=moments, beta2=beta2, cautious=cautious)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=0)
    plain = toy_model()
    plain_opt = Muon(plain.parameters(), lr=lr, momentum=mu, weight_decay=wd)
    for step in range(10):
        train_step(plain, plain_opt, step)
    assert all((p - q).abs().max() > 1e-4 for p, q in zip(model.parameters(), plain.parameters()))  # it acts
    if normuon:
        for p, v in zip(model.parameters(), moments):
            torch.testing.assert_close(opt.state[p]["second_moment"][:, 0], v, atol=1e-7, rtol=1e-5)


def test_normuon_evens_out_the_rows_and_keeps_the_norm():
    from gpt2forge.optim.muon import normuon_

    O = newton_schulz(torch.randn(6, 16))  # tall-ish rows of unequal norm after orthogonalising a skewed matrix
    O = O * torch.linspace(0.2, 2.0, 6)[:, None]
    moment = torch.zeros(6, 1)
    N = normuon_(O, moment, beta2=0.0)  # β2 = 0: the current row norms alone
    rows = N.norm(dim=1)
    torch.testing.assert_close(rows, rows.mean().expand(6))  # every row the same length
    torch.testing.assert_close(N.norm(), O.norm())  # the update's overall size unchanged
    torch.testing.assert_close(moment[:, 0], O.square().mean(dim=1))


def test_cautious_decay_spares_entries_the_update_pushes_away_from_zero():
    from gpt2forge.optim.muon import decay_

    p = torch.tensor([[1.0, -1.0, 2.0, -2.0]])
    o = torch.tensor([[0.5, 0.5, -0.5, -0.5]])  # W ← W − lr·O: entries 0 and 3 shrink anyway, 1 and 2 grow
    decay_([p], [o], 0.1, cautious=True)
    assert p[0].tolist() == pytest.approx([0.9, -1.0, 2.0, -1.8]) and p[0, 1] == -1 and p[0, 2] == 2
    decay_([p], [o], 0.1, cautious=False)
    assert p[0].tolist() == pytest.approx([0.81, -0.9, 1.8, -1.62])


# 3. torch.optim.Muon

def test_agrees_with_torch_muon():
    """Same hyperparameters, bf16 NS on both sides, ``adjust_lr_fn="original"`` (√max(1, rows/cols)).

    The same by design: EMA momentum with lerp (torch's docstring writes B ← μB + g, its code lerps), the Nesterov
    blend, the quintic fused into addmm, decoupled weight decay with the unscaled lr. Different by design: torch
    guards the norm with clamp(min=eps) where we add eps (equal unless the norm is ~0), always runs NS in bf16 (we
    default to fp32 on CPU), has no distributed share, and defaults to lr=1e-3, weight_decay=0.1. With torch 2.13
    on CPU the two are in fact bit-equal; the bf16-level tolerance keeps the test about semantics, not about one
    torch version's rounding (bf16 NS itself is 1–2% from fp32)."""
    TorchMuon = getattr(torch.optim, "Muon", None)
    if TorchMuon is None:
        pytest.skip(f"torch.optim.Muon appeared in torch 2.9; this is {torch.__version__}")
    torch.manual_seed(0)
    shapes = [(48, 24), (24, 64)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    hyper = {"lr": 0.02, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "ns_steps": 5}
    opt = Muon(ours, ns_dtype=torch.bfloat16, **hyper)
    ref = TorchMuon(theirs, adjust_lr_fn="original", **hyper)
    for _ in range(3):
        before = [p.detach().clone() for p in ours]
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        for p, q, b in zip(ours, theirs, before):
            assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
            delta, delta_ref = p.detach() - b, q.detach() - b
            assert (delta - delta_ref).norm() < 0.01 * delta_ref.norm()
            q.data.copy_(p.data)  # compare one step at a time, not drift


# 4. Resume

def lr_at(step: int) -> float:
    return 0.02 * min(1.0, (step + 1) / 4)


def momentum_at(step: int) -> float:
    return 0.85 + 0.10 * min(1.0, step / 5)  # warmup .85 → .95, as the trainer does


def run(model: nn.Module, opt: Muon, steps: range) -> None:
    for step in steps:
        for group in opt.param_groups:
            group["lr"], group["momentum"] = lr_at(step), momentum_at(step)
        train_step(model, opt, step)


@pytest.mark.parametrize("through_disk, switches", [(False, {}), (True, {}),
                                                     (True, {"normuon": True, "cautious_wd": True})])
def test_resume_is_bit_exact(through_disk, switches):
    straight = toy_model()
    opt = Muon(straight.parameters(), weight_decay=0.05, **switches)
    run(straight, opt, range(6))

    first = toy_model()
    opt1 = Muon(first.parameters(), weight_decay=0.05, **switches)
    run(first, opt1, range(3))
    model_state, opt_state = first.state_dict(), opt1.state_dict()
    if through_disk:
        buffer = io.BytesIO()
        torch.save({"model": model_state, "optimizer": opt_state}, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        model_state, opt_state = loaded["model"], loaded["optimizer"]
    resumed = toy_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(model_state)
    opt2 = Muon(resumed.parameters(), weight_decay=0.05, **switches)
    opt2.load_state_dict(opt_state)
    run(resumed, opt2, range(3, 6))

    state = {"momentum_buffer", "second_moment"} if switches.get("normuon") else {"momentum_buffer"}
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        assert set(opt2.state[q]) == state
        assert all(torch.equal(opt.state[p][k], opt2.state[q][k]) for k in state)


# 5. Schedules from outside

def test_lr_and_momentum_are_read_from_the_param_groups():
    model = toy_model()
    opt = Muon(model.parameters(), lr=0.02, momentum=0.95)
    for step in range(3):
        train_step(model, opt, step)

    # momentum 0: the update depends only on the current gradient.
    opt.param_groups[0]["momentum"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt, 3)
    for p, b in zip(model.parameters(), before):
        scale = math.sqrt(max(1, p.size(0) / p.size(1)))
        # A batch of one, as the optimizer stacks each shape: torch's CPU bmm rounds toy sizes unlike mm.
        assert torch.equal(p, b.add(newton_schulz(p.grad[None])[0], alpha=-0.02 * scale))
        assert torch.equal(opt.state[p]["momentum_buffer"], p.grad)

    # lr 0: nothing moves, though the momentum buffer still takes the gradient.
    opt.param_groups[0].update(lr=0.0, momentum=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    train_step(model, opt, 4)
    for p, b, buf in zip(model.parameters(), before, buffers):
        assert torch.equal(p, b)
        assert torch.equal(opt.state[p]["momentum_buffer"], buf.lerp(p.grad, 0.5))


# 6. Distributed

RANK_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    import gpt2forge.optim.muon as muon

    rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    calls = []  # one entry per batched Newton–Schulz: how many matrices it orthogonalised
    plain = muon._iterate
    def counting(X, *args):
        calls.append(X.size(0))
        return plain(X, *args)
    muon._iterate = counting

    shapes = [(16, 8), (8, 24), (16, 8), (12, 12), (8, 24), (16, 8), (5, 7)]  # (5, 7): no gradient, skipped
    def train(steps=4, process_group=None, **switches):
        torch.manual_seed(0)  # the same params and gradients on every rank, as after DDP's all-reduce
        params = [torch.randn(s, requires_grad=True) for s in shapes]
        opt = muon.Muon(params, weight_decay=0.1, process_group=process_group, **switches)
        for step in range(steps):
            opt.param_groups[0].update(lr=0.02 * (step + 1) / steps, momentum=0.85 + 0.03 * step)
            for p in params[:-1]:
                p.grad = torch.randn_like(p)
            opt.step()
        return [p.detach() for p in params], [opt.state[p]["momentum_buffer"] for p in params[:-1]]

    switches = {"normuon": True, "cautious_wd": True}
    reference_switched = train(**switches)  # single process: before the process group exists
    calls.clear()
    reference = train()
    single_calls, single_matrices = len(calls), sum(calls)
    calls.clear()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shared = train()  # the default group
    shared_matrices = sum(calls)
    calls.clear()
    explicit = train(process_group=dist.new_group([0, 1]))
    explicit_matrices = sum(calls)
    switched = train(**switches)
    dist.destroy_process_group()
    torch.save({"reference": reference, "single_calls": single_calls, "single_matrices": single_matrices,
                "shared": shared, "matrices": shared_matrices, "explicit": explicit,
                "explicit_matrices": explicit_matrices, "reference_switched": reference_switched,
                "switched": switched}, out)
""")


def test_distributed_share_is_bit_identical(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), "2", str(outs[r])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for proc in procs:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output

    results = [torch.load(out, weights_only=True) for out in outs]
    assert results[0]["single_calls"] == 4 * 3  # 4 steps × one batched call per shape
    total = results[0]["single_matrices"]
    assert total == 4 * 6  # 4 steps × 6 matrices with gradients
    for r in results:  # each rank orthogonalised only its share: 3 of the 6 matrices
        assert r["matrices"] == r["explicit_matrices"] == total // 2
        for run in ("shared", "explicit"):
            for ref, got in zip(r["reference"], r[run]):  # params, then momentum buffers
                assert all(torch.equal(a, b) for a, b in zip(ref, got))
        for ref, got in zip(r["reference_switched"], r["switched"]):  # NorMuon and cautious decay on
            assert all(torch.equal(a, b) for a, b in zip(ref, got))
        assert not torch.equal(r["switched"][0][0], r["shared"][0][0])
    for a, b in zip(results[0]["shared"][0], results[1]["reference"][0]):
        assert torch.equal(a, b)  # and the same across ranks


# 7. Only matrices

def test_refuses_non_matrix_parameters():
    with pytest.raises(ValueError, match=r"2-D.*shape \(8,\)"):
        Muon([torch.zeros(8, 8, requires_grad=True), torch.zeros(8, requires_grad=True)])
    opt = Muon([torch.zeros(8, 8, requires_grad=True)])
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\)"):
        opt.add_param_group({"params": [torch.zeros(2, 3, 4, requires_grad=True)]})


# 8. Compiling, and on a GPU: batched in bf16, no host syncs

@pytest.mark.parametrize("variant", sorted(NS_VARIANTS))
@pytest.mark.parametrize("shape", [(3, 48, 16), (2, 16, 48), (24, 24)])
def test_the_iteration_compiles_to_one_graph(variant, shape):
    """What CUDA runs through torch.compile: one graph per shape, no breaks (explain traces without Inductor)."""
    import torch._dynamo

    from gpt2forge.optim import muon

    spec = NS_VARIANTS[variant]
    explanation = torch._dynamo.explain(muon._iterate)(torch.randn(shape), spec.schedule(None), spec.norm_scale,
                                                        spec.eps)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_a_failing_compile_falls_back_to_eager_once(monkeypatch):
    from gpt2forge.optim import muon

    def broken():
        def fail(*args):
            raise RuntimeError("no backend here")
        return fail

    monkeypatch.setattr(muon, "_compiled_iterate", broken)
    torch.manual_seed(0)
    a = [torch.randn(16, 8, requires_grad=True), torch.randn(8, 24, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    forced, plain = Muon(a, compile=True), Muon(b)
    for step in range(2):
        for p, q in zip(a, b):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        if step == 0:
            with pytest.warns(RuntimeWarning, match="compile of Newton–Schulz failed .RuntimeError: no backend here"):
                forced.step()
        else:
            forced.step()  # no second warning: it stays eager
        plain.step()
    assert forced.compile is False
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.cuda
def test_cuda_step_is_compiled_sync_free_and_matches_eager():
    torch.manual_seed(0)
    shapes = [(96, 32), (96, 32), (32, 128), (64, 64)]
    params = {mode: [torch.randn(s, device="cuda", requires_grad=True) for s in shapes] for mode in ("c", "e")}
    for a, b in zip(params["c"], params["e"]):
        b.data.copy_(a.data)
    compiled = Muon(params["c"], weight_decay=0.05, ns="track3")
    eager = Muon(params["e"], weight_decay=0.05, ns="track3", compile=False)
    for step in range(3):
        grads = [torch.randn(s, device="cuda") for s in shapes]
        for opt, ps in ((compiled, params["c"]), (eager, params["e"])):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            if step == 2:  # after the compiles: a host sync in the step would raise here
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    assert compiled.compile is not False  # it compiled, rather than falling back
    for a, b in zip(params["c"], params["e"]):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)  # bf16 NS, fused differently when compiled
