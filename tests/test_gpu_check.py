"""The GPU check keeps working without a GPU: its dry run takes every section on the CPU, each in its own process
under its own deadline, and a section that fails or overruns does not stop the next."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "gpu_check.py"


def run_check(tmp_path, *args, shadow_datasets=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if shadow_datasets:  # the GPU machine has no `datasets`: a stand-in that fails on import proves it is not needed
        shadow = tmp_path / "shadow" / "datasets"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ImportError('datasets is not installed on the GPU machine')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(shadow.parent), env.get("PYTHONPATH", "")])
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out), *args],
                            capture_output=True, text=True, timeout=1500, check=False, env=env)
    return result, out


def test_dry_run_measures_every_section(tmp_path):
    result, out = run_check(tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    data = json.loads((out / "gpu-check.json").read_text())
    sections = data["sections"]
    assert list(sections) == ["env", "tests", "reference", "modern", "ddp"]
    assert all(s["status"] == "ok" for s in sections.values()), {k: s["status"] for k, s in sections.items()}
    assert sorted(os.listdir(out)) == ["gpu-check.json", "gpu-check.log", "gpu-check.md"]  # partial/ cleaned up
    sdpa = sections["env"]["sdpa"]
    assert {row["default"] for row in sdpa.values()} == {"flash"}  # the CPU's flash kernel, read off the profiler
    assert all(row["runs_alone"]["math"] == "ok" and row["runs_alone"]["cudnn"] != "ok" for row in sdpa.values())
    tests = sections["tests"]["tests"]
    assert len(tests) >= 10 and {t["outcome"] for t in tests} == {"skipped"}  # collected, skipped without CUDA
    for key, optimizers in (("reference", ["adamw"]), ("modern", ["adamw", "muon"])):
        r = sections[key]
        assert r["optimizers"] == optimizers and r["tokens_per_s"] > 0 and r["bare_tokens_per_s"] > 0
        assert r["flops_per_token"] > 0 and r["llmc_flops_per_token"] > 0 and r["mfu_llmc"] is None  # no CPU peak
        assert r["optimizer_step"]["wall_ms"] >= r["optimizer_step"]["host_ms"] > 0
        assert r["profile"]["top"] and r["profile"]["shares"]["gemm"] > 0
        assert r["profile"]["attention_backend"] == "flash"
        assert r["optimizer_profile"]["shares"]["optimizer"] > 0  # the optimizer had gradients to apply
    assert sections["ddp"]["losses"] and sections["ddp"]["checkpoint"] and sections["ddp"]["ddp_wrapped"]
    md = (out / "gpu-check.md").read_text()
    assert md.startswith("# GPU check (dry run") and "| **total** |" in md and "MFU (llm.c)" in md
    assert "| **total** |" in result.stdout  # the timing table closes the console output


def test_a_failing_section_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    """A section that raises records its traceback and what it saved; one out of time stops at its check."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    section = gpu_check.Section("env", tmp_path)

    def broken(section, deadline, dry):
        section.save(partial_result=1)
        raise ValueError("boom")

    monkeypatch.setitem(gpu_check.RUNNERS, "env", broken)
    assert gpu_check.run_child("env", 30, tmp_path, dry=True) == 1
    data = json.loads(section.path.read_text())
    assert data["partial_result"] == 1 and data["status"].startswith("failed: ValueError: boom")
    assert "Traceback" in data["traceback"]

    def slow(section, deadline, dry):
        for _ in range(1000):
            deadline.check("the next round", needs=1)
            section.save(rounds=section.data.get("rounds", 0) + 1)

    monkeypatch.setitem(gpu_check.RUNNERS, "env", slow)
    assert gpu_check.run_child("env", 0.5, tmp_path, dry=True) == 0
    data = json.loads(section.path.read_text())
    assert data["status"].startswith("stopped at its deadline") and "rounds" not in data  # < 1 s left at once


def test_sections_are_chosen_and_a_crashed_process_is_recorded(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    calls = []

    class Crashing:  # stands in for subprocess.Popen: the section's process dies without writing anything
        def __init__(self, cmd, **kwargs):
            calls.append(cmd[cmd.index("--child") + 1])
            self.pid = 0

        def wait(self, timeout=None):
            return -11

    monkeypatch.setattr(gpu_check.subprocess, "Popen", Crashing)
    result = gpu_check.run_sections(tmp_path, ["env", "ddp"], dry=True, budget=100)
    assert calls == ["env", "ddp"]
    assert all(s["status"].startswith("crashed: exit -11") for s in result["sections"].values())
    assert json.loads((tmp_path / "gpu-check.json").read_text())["sections"].keys() == {"env", "ddp"}
    result = gpu_check.run_sections(tmp_path, ["env"], dry=True, budget=0)
    assert result["sections"]["env"]["status"] == "skipped: out of time" and calls == ["env", "ddp"]
