import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import HELLASWAG_SAMPLE as HELLASWAG  # 64 real validation rows, committed

from gpt2forge.commands import build_parser, main
from gpt2forge.data.loader import val_batches
from gpt2forge.data.shards import write_shard
from gpt2forge.errors import UserError
from gpt2forge.eval.bpb import token_byte_lengths
from gpt2forge.eval.hellaswag import evaluate_hellaswag, load_hellaswag
from gpt2forge.eval.loss import evaluate_loss
from gpt2forge.hf import export_hf
from gpt2forge.models import IGNORE_INDEX
from gpt2forge.models.gpt2 import GPT, GPTConfig
from gpt2forge.weights import save_model


def make_val_dir(path, sizes=(700, 500), seed=0):
    """Random-token val shards (and one train shard, which must be ignored)."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, n in enumerate(sizes):
        write_shard(path / f"toy_val_{i:06d}.bin", rng.integers(0, 50257, n, dtype=np.uint16))
    write_shard(path / "toy_train_000000.bin", rng.integers(0, 50257, 5000, dtype=np.uint16))
    return path


def test_loss_is_the_token_weighted_mean(tiny_model):
    torch.manual_seed(0)
    xs = [torch.randint(0, 50257, (b, 16)) for b in (3, 1, 2)]  # unequal batches: a mean of means would differ
    ys = [torch.randint(0, 50257, x.shape) for x in xs]
    ys[1][0, :10] = -100  # ignored targets count for nothing
    tiny_model.train()
    result = evaluate_loss(tiny_model, zip(xs, ys), device="cpu")
    assert tiny_model.training  # the caller's mode is restored
    with torch.no_grad():
        logits = torch.cat([tiny_model(x)[0].reshape(-1, 50257) for x in xs])
    expected = F.cross_entropy(logits, torch.cat([y.reshape(-1) for y in ys]), ignore_index=-100)
    assert result["tokens"] == 6 * 16 - 10 and result["batches"] == 3
    assert result["loss"] == pytest.approx(expected.item(), rel=1e-6)


def test_no_batches_is_a_clear_error(tiny_model):
    with pytest.raises(UserError, match="no validation tokens"):
        evaluate_loss(tiny_model, [], device="cpu")


def test_mps_accumulates_in_float32_as_it_has_no_float64(tiny_model, monkeypatch):
    """MPS (what --device auto picks on a Mac) has no float64: the loss sum is float32 there, float64 elsewhere."""
    from gpt2forge.eval import loss

    assert loss.accumulator_dtype(torch.device("mps")) == torch.float32
    assert loss.accumulator_dtype(torch.device("cuda")) == torch.float64
    torch.manual_seed(0)
    batches = [(torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))) for _ in range(3)]
    exact = evaluate_loss(tiny_model, batches, device="cpu")
    monkeypatch.setattr(loss, "accumulator_dtype", lambda device: torch.float32)  # the MPS path, on the CPU
    single = evaluate_loss(tiny_model, batches, device="cpu")
    assert single["tokens"] == exact["tokens"] == 3 * 2 * 16 and single["batches"] == 3
    assert single["loss"] == pytest.approx(exact["loss"], rel=1e-6)


def test_compiled_model_gives_the_same_loss_without_recompiling(tmp_path, tiny_model):
    data = make_val_dir(tmp_path / "data", sizes=(1000,))
    eager = evaluate_loss(tiny_model, val_batches(data, 4, 32), device="cpu")
    shapes = []

    def backend(gm, example_inputs):
        shapes.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(tiny_model, backend=backend)
    for _ in range(2):
        result = evaluate_loss(compiled, val_batches(data, 4, 32), device="cpu")
        assert result["tokens"] == eager["tokens"] == (1000 - 1) // 32 * 32  # every sequence, the last batch padded
        assert result["loss"] == pytest.approx(eager["loss"], rel=1e-6)
    assert len(shapes) == 1
    torch._dynamo.reset()


def test_exported_model_has_the_same_val_loss_in_transformers(tmp_path):
    """The issue's export check: transformers' own loss (labels=...) on the exported model equals ours."""
    import transformers
    torch.manual_seed(5)
    ours = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_multiple=128)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(ours, tmp_path / "hf")).eval()
    data = make_val_dir(tmp_path / "data")
    seq_len = 31  # HF reads the whole window (inputs + last target): 32 tokens, its n_positions
    result = evaluate_loss(ours, val_batches(data, 4, seq_len), device="cpu")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for x, y in val_batches(data, 4, seq_len):
            real = (y != IGNORE_INDEX).all(dim=1)  # the last batch is filled up with ignored rows
            window = torch.cat([x[real], y[real, -1:]], dim=1)
            total += hf(input_ids=window, labels=window).loss.item() * y[real].numel()  # HF shifts labels itself
            tokens += y[real].numel()
    assert result["tokens"] == tokens == (699 // 31 + 499 // 31) * 31  # every sequence of the two val shards
    assert result["loss"] == pytest.approx(total / tokens, abs=1e-5)


def checkpoint(tmp_path, model):
    directory = tmp_path / "run" / "step-000007"
    directory.mkdir(parents=True)
    save_model(model, directory)
    (directory / "train_state.json").write_text(json.dumps({"step": 7, "tokens": 7168}))
    (tmp_path / "run" / "latest").write_text("step-000007\n")
    return directory


def test_eval_cli_val_loss_and_token_budget(tmp_path, tiny_model, capsys):
    data = make_val_dir(tmp_path / "data")
    ckpt = checkpoint(tmp_path, tiny_model)
    expected = evaluate_loss(tiny_model, val_batches(data, 2, 64), device="cpu")
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", str(data), "--batch-size", "2"]) == 0
    assert f"val loss   {expected['loss']:.4f}" in capsys.readouterr().out
    saved = json.loads((ckpt / "eval.json").read_text())
    assert saved["val"]["loss"] == pytest.approx(expected["loss"], rel=1e-9)
    assert saved["val"]["tokens"] == expected["tokens"] == 17 * 64  # 10 + 7 sequences of 64, whatever the batch
    assert saved["val"]["shards"] == ["toy_val_000000.bin", "toy_val_000001.bin"]
    assert saved["step"] == 7 and saved["tokens_seen"] == 7168  # from train_state.json

    out = tmp_path / "budget.json"
    args = ["eval", "--model", str(ckpt), "--data", str(data), "--batch-size", "2", "--val-tokens", "300",
            "--out", str(out)]
    assert main(args) == 0
    assert json.loads(out.read_text())["val"]["tokens"] == 256  # the first 300 // 64 = 4 sequences
    args = build_parser("eval").parse_args(["--model", str(ckpt), "--val-tokens", "10M"])
    assert args.val_tokens == 10_000_000  # counts as prepare and train take them


def test_eval_cli_errors_name_the_problem(tmp_path, tiny_model, hf_model_dir, capsys):
    ckpt = checkpoint(tmp_path, tiny_model)
    assert main(["eval", "--model", str(ckpt)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", "--model", str(ckpt), "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    small = make_val_dir(tmp_path / "small", sizes=(50,))
    assert main(["eval", "--model", str(ckpt), "--data", str(small)]) == 2
    assert "too few tokens for one sequence of 64+1 tokens" in capsys.readouterr().err
    assert main(["eval", "--model", str(ckpt), "--data", str(small), "--seq-len", "65"]) == 2
    assert "--seq-len 65 exceeds the model's context of 64" in capsys.readouterr().err
    # a Hugging Face model: printed, not written into its directory
    data = make_val_dir(tmp_path / "data")
    assert main(["eval", "--model", str(hf_model_dir), "--data", str(data), "--batch-size", "2"]) == 0
    assert "results not saved; pass --out FILE" in capsys.readouterr().out
    assert not (hf_model_dir / "eval.json").exists()


def test_eval_under_torchrun_matches_one_process(tmp_path, tiny_model):
    data = make_val_dir(tmp_path / "data")
    ckpt = checkpoint(tmp_path, tiny_model)
    single = evaluate_loss(tiny_model, val_batches(data, 2, 64), device="cpu", token_bytes=token_byte_lengths())
    swag = evaluate_hellaswag(tiny_model, load_hellaswag(HELLASWAG, limit=5), device="cpu", batch_size=4,
                              progress=False)
    out = tmp_path / "ddp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "gpt2forge.cli", "eval", "--model", str(ckpt), "--data", str(data), "--batch-size", "2",
               "--hellaswag-file", str(HELLASWAG), "--hellaswag-limit", "5", "--device", "cpu",
               "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("val loss") == 1  # only rank 0 prints
    assert result.stderr.count("val loss: 100%") == 1  # and shows progress (stderr)
    saved = json.loads(out.read_text())
    assert saved["world_size"] == 2 and saved["val"]["tokens"] == single["tokens"]
    assert saved["val"]["loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert saved["val"]["bytes"] == single["bytes"] and saved["val"]["bpb"] == pytest.approx(single["bpb"], rel=1e-6)
    assert {k: saved["hellaswag"][k] for k in ("n", "correct", "correct_norm")} == {
        k: swag[k] for k in ("n", "correct", "correct_norm")
    }
