"""The README's main command, end to end: prepare, train, beat the unigram baseline, report, sample, resume.

Shortened: the quickstart spends its time on the 50,257-way softmax of every token it trains or evaluates, so
the test trains 40 steps (82K tokens) instead of 150 and evaluates less. At 40 steps the tiny model beats the
unigram baseline on the same val tokens by ~0.2 nats (measured: -0.05 at step 30, +0.2 at 40, +0.3 at 60 of a
60-step run, on 32K val tokens); the full quickstart does by ~0.6."""

import numpy as np

from gpt2forge.cli import main
from gpt2forge.data.shards import write_shard
from gpt2forge.quickstart import unigram_loss

STEPS = 40
LEAN = ["--steps", str(STEPS), "--val-tokens", "32768", "--eval.val_tokens=4096"]  # in-loop evaluations: 2 batches


def test_unigram_loss_is_the_cross_entropy_of_train_frequencies(tmp_path):
    write_shard(tmp_path / "x_train_000001.bin", np.array([1, 1, 1, 2], dtype=np.uint16))
    write_shard(tmp_path / "x_val_000000.bin", np.array([1, 2], dtype=np.uint16))
    # add-one smoothing over a 4-token vocabulary: p(1) = 4/8, p(2) = 2/8
    assert unigram_loss(tmp_path, vocab_size=4) == -(np.log(4 / 8) + np.log(2 / 8)) / 2
    assert unigram_loss(tmp_path, vocab_size=4, targets=np.array([2])) == -np.log(2 / 8)  # the tokens a model saw


def test_quickstart_runs_offline_and_beats_the_unigram_baseline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", *LEAN]) == 0
    captured = capsys.readouterr()
    out = captured.out
    line = next(text for text in out.splitlines() if "validation loss" in text and "unigram baseline" in text)
    val_loss, baseline = float(line.split()[2]), float(line.split()[6].rstrip(":"))
    assert val_loss < baseline - 0.1, line
    assert "on the same 32,768 val tokens" in out
    assert "val loss: 100%" in captured.err and "16/16" in captured.err  # the final evaluation shows progress
    run_dir = tmp_path / "out" / "quickstart"
    assert (run_dir / "report.png").stat().st_size > 20_000 and (run_dir / "report.md").is_file()
    assert (run_dir / "latest").read_text().strip() == f"step-{STEPS:06d}"
    assert "--- sample 2 ---" in out
    # run again: data and training are complete, so nothing is redone and the same numbers come out
    rows = (run_dir / "metrics.csv").read_text()
    assert main(["quickstart", *LEAN]) == 0
    again = capsys.readouterr()
    assert "already complete" in again.err and f"resuming from out/quickstart/step-{STEPS:06d}" in again.out
    assert line in again.out and (run_dir / "metrics.csv").read_text() == rows
