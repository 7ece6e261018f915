"""The CUDA path, for a GPU machine (``benchmarks/gpu_check.sh`` runs these; elsewhere they are skipped): bf16
and compiled training steps of both architectures, flash SDPA against manual attention, fused AdamW, Muon's bf16
Newton–Schulz, KV-cached generation, validation and HellaSwag with compile, the chunked loss."""

import pytest
import torch
from test_train import config

from gpt2forge.models import Runtime, build_model, make_config
from gpt2forge.sample import generate

pytestmark = pytest.mark.cuda
ARCHS = ["gpt2", "modern"]
CUDA = {"train.device": "cuda", "train.precision": "bf16"}


def small(arch, **runtime):
    torch.manual_seed(0)
    fields = {"n_layer": 2, "vocab_size": 512, "vocab_multiple": 64} | ({} if arch == "gpt2" else {"zero_init": False})
    return build_model(make_config(arch, "tiny", **fields), Runtime(**runtime)).cuda()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("compile_", [False, True])
def test_bf16_training_steps_learn_on_cuda(data_dir, tmp_path, arch, compile_):
    from gpt2forge.train.trainer import train

    extra = {"model.arch": arch, "train.compile": compile_, **CUDA}
    if arch == "modern":
        extra.update({"model.n_head": 2, "optim.optimizer": "muon", "optim.matrix_lr": 0.02})
    result = train(config(data_dir, tmp_path, **extra))
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    assert result.losses[8] < result.losses[1] and result.val_loss is not None


@pytest.mark.parametrize("arch", ARCHS)
def test_flash_sdpa_matches_manual_attention(arch):
    sdpa, manual = small(arch), small(arch, attention="manual")
    manual.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 512, (4, 200), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = sdpa(idx)[0].float(), manual(idx)[0].float()
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()


def test_fused_adamw_is_used_and_matches_foreach():
    from gpt2forge.config import OptimSection
    from gpt2forge.optim import build_optimizers

    models = [small("gpt2"), small("gpt2")]
    opts = [build_optimizers(m, OptimSection(fused=f), "cuda", 10) for m, f in zip(models, (True, False))]
    assert opts[0].optimizers["adamw"].defaults["fused"] and not opts[1].optimizers["adamw"].defaults["fused"]
    idx = torch.randint(0, 512, (2, 64), device="cuda")
    for model, opt in zip(models, opts):
        for step in range(3):
            opt.set_step(step)
            model(idx, idx)[1].backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_muon_runs_newton_schulz_in_bf16_on_cuda():
    from gpt2forge.optim.muon import newton_schulz

    g = torch.randn(256, 512, device="cuda")
    out = newton_schulz(g)
    assert out.dtype == torch.float32 and out.is_cuda
    s = torch.linalg.svdvals(out)
    assert 0.5 < s.min().item() and s.max().item() < 1.3


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cached_generation_equals_uncached_on_cuda(arch):
    model = small(arch).double().eval()
    prompt = torch.randint(0, 512, (2, 7), device="cuda")
    a = generate(model, prompt, 300, temperature=0, stop_token=None)  # past the 256-token context
    b = generate(model, prompt, 300, temperature=0, stop_token=None, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_validation_and_hellaswag_with_compile(arch):
    from conftest import HELLASWAG_SAMPLE

    from gpt2forge.eval.hellaswag import evaluate_hellaswag, load_hellaswag
    from gpt2forge.eval.loss import evaluate_loss

    model = build_model(make_config(arch, "tiny", n_layer=2)).cuda()
    compiled = torch.compile(model)
    batches = [(x, x) for x in torch.randint(0, 50257, (3, 4, 128), device="cuda")]
    eager = evaluate_loss(model, batches, device="cuda", autocast_dtype=torch.bfloat16)["loss"]
    fast = evaluate_loss(compiled, batches, device="cuda", autocast_dtype=torch.bfloat16)["loss"]
    assert fast == pytest.approx(eager, rel=2e-2)
    data = load_hellaswag(HELLASWAG_SAMPLE, limit=16)
    out = evaluate_hellaswag(compiled, data, device="cuda", batch_size=16, autocast_dtype=torch.bfloat16,
                             block_size=model.config.block_size, progress=False)
    assert out["n"] == 16 and 0 <= out["acc_norm"] <= 1


def test_chunked_loss_matches_and_saves_memory_on_cuda():
    models = {kind: small("gpt2", loss=kind) for kind in ("reference", "chunked")}
    models["chunked"].load_state_dict(models["reference"].state_dict())
    idx = torch.randint(0, 512, (16, 256), device="cuda")
    losses, peaks = {}, {}
    for kind, model in models.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(idx, idx)[1]
        loss.backward()
        torch.cuda.synchronize()
        losses[kind], peaks[kind] = loss.item(), torch.cuda.max_memory_allocated() - base
    assert losses["chunked"] == pytest.approx(losses["reference"], rel=1e-4)
    assert peaks["chunked"] < peaks["reference"]
