"""What the GPU check reads off the profiler: the SDPA backend that ran (not assumed), and kernel categories."""

import torch

from gpt2forge.bench.kernels import category, kernel_summary, profile_steps, sdpa_backends
from gpt2forge.models import Runtime, build_model, make_config


def tiny(attention):
    torch.manual_seed(0)
    return build_model(make_config("gpt2", "tiny", n_layer=1, vocab_size=256, vocab_multiple=64),
                       Runtime(attention=attention))


def test_sdpa_backend_is_read_off_the_profile():
    idx = torch.randint(0, 256, (2, 32))
    found = sdpa_backends(tiny("sdpa"), idx, None)
    assert found["default"] == "flash"  # the CPU's flash kernel
    assert found["runs_alone"]["math"] == "ok" and found["runs_alone"]["efficient"].startswith("failed: ")
    assert sdpa_backends(tiny("manual"), idx, None)["default"] is None  # no fused attention op ran


def test_kernel_names_fall_into_categories():
    assert category("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>") == "attention"
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert category("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT") == "gemm"
    assert category("triton_red_fused__log_softmax_backward_data_nll_loss_backward_0") == "loss"
    assert category("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    assert category("triton_poi_fused_add_gelu_3") == "other"


def test_kernel_summary_of_a_cpu_step():
    model = tiny("sdpa")
    idx = torch.randint(0, 256, (2, 32))

    def step():
        model(idx, idx)[1].backward()

    summary = kernel_summary(profile_steps(step, torch.device("cpu"), steps=2), torch.device("cpu"), steps=2)
    assert summary["attention_backend"] == "flash" and summary["shares"]["gemm"] > 0
    assert abs(sum(summary["shares"].values()) - 1) < 1e-6 and summary["top"][0]["ms"] >= summary["top"][-1]["ms"]
    assert {r["category"] for r in summary["loss_kernels"]} == {"loss"} and summary["loss_kernels"]
