"""The CUDA path, for a GPU machine (``benchmarks/gpu_check.sh`` runs these; elsewhere they are skipped): the fused
SDPA backend each architecture runs (and that it matches manual attention), fused AdamW, Muon's bf16 Newton–Schulz,
the chunked loss's memory, KV-cached generation, bf16 and compiled training steps of both architectures, the modern
recipe's compiled step, compiled DDP in a 1-process group, validation and HellaSwag with compile. Ordered cheap
first: the GPU check stops pytest at its deadline, and the eager tests should have run by then."""

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
def test_sdpa_runs_a_fused_backend_and_matches_manual_attention(arch):
    """At the recipes' head sizes (GPT-2 64, modern 128) the default dispatch runs a fused kernel — flash, cuDNN or
    memory-efficient, read off the profiler, not assumed — and flash can run alone; the result is manual
    attention's."""
    from gpt2forge.bench.kernels import sdpa_backends

    n_head = 4 if arch == "gpt2" else 2  # n_embd 256: head dim 64 / 128
    fields = {"n_layer": 2, "n_embd": 256, "n_head": n_head, "vocab_size": 512, "vocab_multiple": 64}
    fields |= {} if arch == "gpt2" else {"zero_init": False}
    models = []
    for attention in ("sdpa", "manual"):
        torch.manual_seed(0)
        models.append(build_model(make_config(arch, "tiny", **fields), Runtime(attention=attention)).cuda())
    sdpa, manual = models
    idx = torch.randint(0, 512, (4, 256), device="cuda")
    backends = sdpa_backends(sdpa, idx, torch.bfloat16)
    print(arch, backends)  # the GPU check's log keeps which one
    assert backends["default"] in ("flash", "cudnn", "efficient") and backends["runs_alone"]["flash"] == "ok"
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


def test_chunked_loss_matches_and_saves_memory_on_cuda():
    """At GPT-2's padded vocabulary and 8,192 rows the fp32 logits are 1.6 GB, several 256 MB chunks: the chunked
    loss must save at least one whole fp32 copy of them against the reference loss (a CPU replica measured 4.8 vs
    2.6 GB of peak), and give its number."""
    torch.manual_seed(0)
    fields = {"n_layer": 1, "block_size": 1024, "vocab_multiple": 128}
    models = {kind: build_model(make_config("gpt2", "tiny", **fields), Runtime(loss=kind)).cuda()
              for kind in ("reference", "chunked")}
    models["chunked"].load_state_dict(models["reference"].state_dict())
    idx = torch.randint(0, 50257, (8, 1024), device="cuda")
    fp32_logits = idx.numel() * models["reference"].config.padded_vocab_size * 4
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
        model.zero_grad(set_to_none=True)
    print({k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()})
    assert losses["chunked"] == pytest.approx(losses["reference"], rel=1e-4)
    assert peaks["reference"] - peaks["chunked"] > fp32_logits


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cached_generation_equals_uncached_on_cuda(arch):
    model = small(arch).double().eval()
    prompt = torch.randint(0, 512, (2, 7), device="cuda")
    a = generate(model, prompt, 300, temperature=0, stop_token=None)  # past the 256-token context
    b = generate(model, prompt, 300, temperature=0, stop_token=None, use_cache=False)
    assert torch.equal(a, b)


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


def test_modern_recipe_compiled_step_on_cuda(data_dir, tmp_path):
    """The modern recipe as shipped (Muon + AdamW, chunked soft-capped loss, no clipping, its schedule), only
    shallower, compiled in bf16: its steps learn."""
    from gpt2forge.config import load_config
    from gpt2forge.train.trainer import train

    overrides = {"model.n_layer": 2, "model.vocab_size": 512, "data.dir": data_dir, "log.out_dir": tmp_path,
                 "train.max_steps": 8, "train.micro_batch_size": 4, "train.seq_len": 128,
                 "train.total_batch_tokens": 1024, "train.device": "cuda", "eval.val_every": 0,
                 "eval.hellaswag_every": 0, "eval.sample_every": 0, "checkpoint.every": 0}
    config = load_config("gpt2-124m-modern-fineweb-edu", [f"--{k}={v}" for k, v in overrides.items()])
    assert config.train.compile and config.optim.optimizer == "muon" and config.train.loss == "chunked"
    result = train(config)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    assert result.losses[8] < result.losses[1]


def test_compiled_ddp_in_a_one_process_group_matches_eager_on_cuda():
    """DDP as the trainer wraps it (no buffer broadcast, gradients as bucket views), compiled, in a 1-rank NCCL
    group: the losses of the same model trained eagerly without DDP."""
    import torch.distributed as dist

    from gpt2forge.config import OptimSection
    from gpt2forge.optim import build_optimizers
    from gpt2forge.train.parallelize import Parallel

    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        eager_model, ddp_model = small("gpt2"), small("gpt2")
        wrapped = Parallel(None, torch.device("cuda", torch.cuda.current_device()), 0, 1, fsdp=False).wrap(ddp_model)
        assert type(wrapped).__name__ == "DistributedDataParallel"
        runs = {"eager": (eager_model, eager_model), "compiled ddp": (ddp_model, torch.compile(wrapped))}
        losses = {}
        for name, (model, forward) in runs.items():
            opt = build_optimizers(model, OptimSection(), "cuda", 10)
            torch.manual_seed(1)
            losses[name] = []
            for step in range(4):
                idx = torch.randint(0, 512, (4, 128), device="cuda")
                opt.set_step(step)
                _, loss = forward(idx, idx)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses[name].append(loss.item())
    finally:
        dist.destroy_process_group()
    assert losses["compiled ddp"] == pytest.approx(losses["eager"], rel=1e-3)
    assert losses["eager"][-1] < losses["eager"][0]



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
