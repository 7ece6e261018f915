"""Bits per byte: the bytes are those the scored target tokens decode to, and bpb = Σ nats / (ln 2 · Σ bytes)."""

import json
import math

import numpy as np
import pytest
import torch

from gpt2forge import dist
from gpt2forge.commands import main
from gpt2forge.config import load_config
from gpt2forge.data.loader import val_batches
from gpt2forge.data.shards import write_shard
from gpt2forge.eval.bpb import token_byte_lengths
from gpt2forge.eval.loss import evaluate_loss
from gpt2forge.models import IGNORE_INDEX, build_model
from gpt2forge.tokenizer import EOT_TOKEN, get_tokenizer
from gpt2forge.weights import save_model

DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Unicode costs more bytes than tokens suggest: naïve café, 東京タワー, emoji 😀🎉, and math ∑∫√.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # five\n",
    "Bits per byte compare models whose tokenizers differ; nats per token do not.",
] * 6


def real_text_val_dir(path):
    """A val shard of real GPT-2 tokens: documents, each followed by <|endoftext|>, as prepare writes them."""
    tok = get_tokenizer()
    tokens = [t for doc in DOCUMENTS for t in tok.encode(doc) + [EOT_TOKEN]]
    path.mkdir(parents=True)
    write_shard(path / "text_val_000000.bin", np.array(tokens, dtype=np.uint16))
    write_shard(path / "text_train_000000.bin", np.array(tokens, dtype=np.uint16))
    return path, tokens


def test_byte_table_counts_the_utf8_bytes_of_text():
    tok, table = get_tokenizer(), token_byte_lengths()
    for text in DOCUMENTS[:4]:
        ids = tok.encode(text)
        assert int(table[ids].sum()) == len(text.encode("utf-8"))  # tokens that split a character included
    assert table[EOT_TOKEN] == 0 and table.shape == (50257,)


def test_bpb_is_total_nats_over_the_decoded_bytes_of_the_scored_targets(tmp_path, tiny_model):
    data, tokens = real_text_val_dir(tmp_path / "data")
    seq_len, budget = 32, 200  # the first 200 // 32 = 6 sequences, batches of 4: the last one padded
    result = evaluate_loss(tiny_model, val_batches(data, 4, seq_len, max_tokens=budget), device="cpu",
                           token_bytes=token_byte_lengths())
    targets = [t for x, y in val_batches(data, 4, seq_len, max_tokens=budget) for t in y[y != IGNORE_INDEX].tolist()]
    assert targets == tokens[1 : 6 * 32 + 1]  # the sequences the budget scores, shifted by one
    decoded = get_tokenizer().decode_bytes([t for t in targets if t != EOT_TOKEN])
    assert result["tokens"] == 192 and result["bytes"] == len(decoded)
    assert result["bpb"] == pytest.approx(result["loss"] * result["tokens"] / (math.log(2) * len(decoded)), rel=1e-12)
    plain = evaluate_loss(tiny_model, val_batches(data, 4, seq_len, max_tokens=budget), device="cpu")
    assert plain == {k: result[k] for k in ("loss", "tokens", "batches")}  # bytes change nothing else


def test_bytes_are_summed_over_ranks_like_the_nats(tmp_path, tiny_model, monkeypatch):
    data, _ = real_text_val_dir(tmp_path / "data")
    whole = evaluate_loss(tiny_model, val_batches(data, 2, 32), device="cpu", token_bytes=token_byte_lengths())
    parts = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op="sum": parts.append(t.clone()) or t)
    for rank in range(3):
        evaluate_loss(tiny_model, val_batches(data, 2, 32, rank=rank, world_size=3), device="cpu", world_size=3,
                      token_bytes=token_byte_lengths())
    nats, tokens, _, n_bytes = (sum(parts[i::4]).item() for i in range(4))  # 4 sums per rank, in order
    assert tokens == whole["tokens"] and n_bytes == whole["bytes"]
    assert nats / tokens == pytest.approx(whole["loss"], rel=1e-9)


def test_quickstart_sized_model_reports_bpb_next_to_nats_per_token(tmp_path, capsys):
    data, tokens = real_text_val_dir(tmp_path / "data")
    config = load_config("quickstart").model  # the quickstart's model: tiny preset, GPT-2's full vocabulary
    torch.manual_seed(0)
    ckpt = tmp_path / "run" / "step-000000"
    ckpt.mkdir(parents=True)
    save_model(build_model(config), ckpt)
    (tmp_path / "run" / "latest").write_text("step-000000\n")
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", str(data), "--seq-len", "128",
                 "--no-progress"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("val loss"))
    val = json.loads((ckpt / "eval.json").read_text())["val"]
    assert f"{val['loss']:.4f} nats/token   {val['bpb']:.4f} bits/byte" in line
    scored = tokens[1 : (len(tokens) - 1) // 128 * 128 + 1]
    assert val["bytes"] == len(get_tokenizer().decode_bytes([t for t in scored if t != EOT_TOKEN]))
    assert val["bpb"] == pytest.approx(val["loss"] * val["tokens"] / math.log(2) / val["bytes"], rel=1e-12)
    assert val["loss"] == pytest.approx(math.log(50257), abs=0.5)  # an untrained model: about uniform
