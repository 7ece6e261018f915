"""The README's main command, end to end (shortened): prepare, train, beat the unigram baseline, report, sample."""

import numpy as np

from gpt2forge.cli import main
from gpt2forge.data.shards import write_shard
from gpt2forge.quickstart import unigram_loss


def test_unigram_loss_is_the_cross_entropy_of_train_frequencies(tmp_path):
    write_shard(tmp_path / "x_train_000001.bin", np.array([1, 1, 1, 2], dtype=np.uint16))
    write_shard(tmp_path / "x_val_000000.bin", np.array([1, 2], dtype=np.uint16))
    # add-one smoothing over a 4-token vocabulary: p(1) = 4/8, p(2) = 2/8
    assert unigram_loss(tmp_path, vocab_size=4) == -(np.log(4 / 8) + np.log(2 / 8)) / 2


def test_quickstart_runs_offline_and_beats_the_unigram_baseline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--steps", "60"]) == 0
    out = capsys.readouterr().out
    line = next(text for text in out.splitlines() if text.startswith("3/4 validation loss"))
    val_loss, baseline = float(line.split()[3]), float(line.split()[7].rstrip(":"))
    assert val_loss < baseline - 0.1, line
    run_dir = tmp_path / "out" / "quickstart"
    assert (run_dir / "report.png").stat().st_size > 20_000 and (run_dir / "report.md").is_file()
    assert (run_dir / "latest").read_text().strip() == "step-000060"
    assert "--- sample 2 ---" in out
    # run again: data and training are complete, so nothing is redone and the same numbers come out
    rows = (run_dir / "metrics.csv").read_text()
    assert main(["quickstart", "--steps", "60"]) == 0
    again = capsys.readouterr()
    assert "already complete" in again.err and "resuming from out/quickstart/step-000060" in again.out
    assert line in again.out and (run_dir / "metrics.csv").read_text() == rows
