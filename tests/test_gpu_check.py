"""The prepared GPU check keeps working without a GPU: its dry run takes every step on the CPU."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_measures_every_section(tmp_path):
    # The GPU machine has no `datasets` and no network: a stand-in that fails on import proves the check needs neither.
    shadow = tmp_path / "shadow" / "datasets"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('datasets is not installed on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
                            capture_output=True, text=True, timeout=900, check=False, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "bench-cpu-dry-run.json").read_text())
    recipes = data["sections"]["recipes"]["rows"]
    assert [r["recipe"] for r in recipes] == ["gpt2-124m-fineweb-edu-10b", "gpt2-124m-modern-fineweb-edu"]
    assert all(r["tokens_per_s"] > 0 and r["bare_tokens_per_s"] > 0 for r in recipes)
    assert recipes[1]["optimizers"] == ["adamw", "muon"]
    assert [r["key"] for r in data["sections"]["ablation"]["rows"]][0] == "fp32"
    assert {r["loss"] for r in data["sections"]["memory"]["loss"]["rows"]} == {"reference", "chunked"}
    assert "cuda" in (out / "cuda-tests.txt").read_text()  # the CUDA tests were collected (and skipped)
    assert (out / "bench-cpu-dry-run.md").read_text().startswith("# GPU check")
