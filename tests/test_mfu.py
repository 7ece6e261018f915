"""MFU in two accountings: ours (nanoGPT's 6N + 12·L·H·Q·T) and llm.c's (6N + 6·L·C·T, N every parameter), side
by side in metrics.csv and on the step line, so a figure compares with published ones."""

import csv

import pytest
from test_train import config

from gpt2forge.models import build_model, make_config
from gpt2forge.train.metrics import llmc_flops_per_token, mfu, step_line


def test_llmc_count_for_gpt2_124m_is_llmcs():
    model = build_model(make_config("gpt2", "gpt2", vocab_multiple=128))
    assert model.num_params() == 124_475_904  # llm.c's "num_parameters" (vocab padded to 50304, wpe included)
    assert llmc_flops_per_token(model, 1024) == 6 * 124_475_904 + 6 * 12 * 768 * 1024
    assert model.flops_per_token(1024) / llmc_flops_per_token(model, 1024) == pytest.approx(1.0646, abs=1e-4)
    assert mfu(500_000, 8e8, None) is None and mfu(500_000, 8e8, 1e15) == pytest.approx(0.4)


def test_step_line_shows_both_and_stays_short():
    row = {"step": 5, "loss": 3.0, "lr": 6e-4, "grad_norm": 0.5, "step_ms": 110.0, "tokens_per_s": 476_000.0,
           "mfu": 0.4115, "mfu_llmc": 0.3866}
    line = step_line(row, 19073, 3600.0)
    assert "MFU 41.1% (llm.c 38.7%) | ETA" in line and len(line) < 125
    assert "llm.c" not in step_line({**row, "mfu": None, "mfu_llmc": None}, 19073, None)


def test_trainer_writes_both_columns(data_dir, tmp_path, monkeypatch):
    import gpt2forge.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "peak_flops", lambda device: 1e12)  # a CPU has no peak: pretend one
    result = trainer_module.train(config(data_dir, tmp_path, **{"train.max_steps": 2, "eval.val_every": 0}))
    with open(result.run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"]]
    model = build_model(config(data_dir, tmp_path).model)
    ratio = llmc_flops_per_token(model, 32) / model.flops_per_token(32)
    for row in rows:
        assert float(row["mfu_llmc"]) / float(row["mfu"]) == pytest.approx(ratio, rel=1e-4)
