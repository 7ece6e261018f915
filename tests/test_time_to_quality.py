"""The time-to-quality benchmark follows its protocol: a baseline LR sweep over seeds, the modern recipe as
separate full runs (each with its own schedule), L* the best mean, the headline derived from the table."""

import json
import subprocess
import sys
from pathlib import Path

from gpt2forge.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_follows_the_protocol(tmp_path):
    out = tmp_path / "ttq"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "time_to_quality.py"), "--quick", "--work", str(tmp_path / "w"),
           "--out", str(out), "--steps", "6", "--lrs", "1e-3,3e-3,1e-2", "--seeds", "0,1", "--fractions", "1,0.5"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0 and "## Result" in out.with_suffix(".md").read_text()

    baseline = [r for r in data["runs"] if r["recipe"] == "quickstart"]
    modern = [r for r in data["runs"] if r["recipe"] == "quickstart-modern"]
    assert sorted((r["lr"], r["seed"]) for r in baseline) == [(lr, s) for lr in (1e-3, 3e-3, 1e-2) for s in (0, 1)]
    assert sorted((r["steps"], r["seed"]) for r in modern) == [(3, 0), (3, 1), (6, 0), (6, 1)]
    for run in modern:  # a shorter budget is its own full run: its schedule ends at its own last step
        assert load_config(str(Path(run["run_dir"]) / "config.toml")).train.max_steps == run["steps"]
        assert run["tokens"] == run["steps"] * data["tokens_per_step"]
    losses = {r["val_loss"] for r in data["runs"]}
    assert len(losses) == len(data["runs"])  # every run was scored, and on its own weights

    summary = data["summary"]
    means = {lr: row["val_loss"] for lr, row in summary["baseline_lrs"].items()}
    assert summary["target_val_loss"] == min(means.values())
    assert summary["target_val_loss"] == means[str(summary["best_lr"])]
    reaching = [row["fraction"] for row in summary["modern"] if row["val_loss"][0] <= summary["target_val_loss"]]
    assert summary["smallest_fraction_reaching_target"] == (min(reaching) if reaching else None)
    full = next(row for row in summary["modern"] if row["fraction"] == 1)
    assert summary["gap_at_equal_steps"] == summary["target_val_loss"] - full["val_loss"][0]
    assert summary["heldout_baseline"] is not None and summary["heldout_modern"] is not None
    cost = data["step_cost"]
    assert cost["ratio"] == cost["ms_per_step"]["quickstart-modern"] / cost["ms_per_step"]["quickstart"]
