"""`gpt2forge bench`: the seconds-long mode writes a complete report, and the micro-batch search is exact."""

import json

import pytest
import torch

from gpt2forge import bench
from gpt2forge import commands as cli
from gpt2forge.bench.ablation import STAGES, Contender, cumulative_settings, same_rounds, unavailable
from gpt2forge.bench.measure import spread
from gpt2forge.bench.memory import largest_fitting


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick --profile run on the CPU (5-20 s): its JSON and markdown."""
    out = tmp_path_factory.mktemp("bench")
    args = cli.build_parser("bench").parse_args(["--quick", "--device", "cpu", "--profile", "--out", str(out)])
    result = bench.run_bench(bench.resolve_options(args))
    assert sorted(p.name for p in out.iterdir()) == ["bench-cpu-quick.json", "bench-cpu-quick.md"]
    on_disk = json.loads((out / "bench-cpu-quick.json").read_text())
    assert on_disk["ablation"]["rows"] == json.loads(json.dumps(result["ablation"]["rows"]))
    return on_disk, (out / "bench-cpu-quick.md").read_text()


def test_ablation_has_every_row_in_order_each_with_a_figure_or_a_reason(quick):
    result, _ = quick
    rows = result["ablation"]["rows"]
    assert [r["key"] for r in rows] == [s.key for s in STAGES]
    assert [r["a100_ref_ms"] for r in rows] == [1000, 333, 300, 130, 96, 93, 90]
    for r in rows:
        if r["reason"]:
            assert "ms_per_step" not in r
            continue
        for column in ("ms_per_step", "ms_min", "ms_max", "tokens_per_s", "tflops", "peak_mib", "speedup"):
            assert r[column] > 0, (r["key"], column)
        assert r["mfu"] is None  # no known CPU peak ...
    assert "CPU" in result["ablation"]["mfu_reason"]  # ... and the report says why
    measured = [r["key"] for r in rows if not r["reason"]]
    assert measured == ["fp32", "bf16"] and rows[0]["speedup"] == 1.0
    assert rows[1]["reason"].startswith("CUDA only")
    assert all("--quick" in r["reason"] for r in rows[3:])
    assert "aten::" in result["ablation"]["profile"]  # --profile: the top ops of the last measured row


def test_other_sections_and_the_record_of_how(quick):
    result, _ = quick
    overhead = result["overhead"]
    assert isinstance(overhead["overhead_pct"], float) and overhead["bare_ms"]["median"] > 0
    assert len(overhead["trainer_ms"]["samples"]) == overhead["rounds"]
    assert result["data"]["loader"]["ms_per_batch"]["median"] > 0
    assert result["data"]["prepare"]["reason"]
    assert "GPU only" in result["memory"]["reason"]
    assert result["command"].startswith("gpt2forge bench ") and "--quick" in result["command"]
    assert result["hardware"]["cpu"] and result["versions"]["torch"]
    assert set(result["load"]) == set(bench.SECTIONS)


def test_markdown_table(quick):
    _, md = quick
    header = next(line for line in md.splitlines() if line.startswith("| # | configuration"))
    for column in ("ms/step", "tokens/s", "MFU", "peak MiB", "speed-up", "A100 ref"):
        assert column in header
    table = [line for line in md.splitlines() if line[:4] in {f"| {i} " for i in range(1, 8)}]
    assert [line.split(" | ")[1] for line in table] == [s.label for s in STAGES]
    assert "TokenLoader.batch" in md and "MFU: n/a" in md
    # --quick is a smoke test: said at the top, and its overhead figure is not printed as a finding
    assert "Smoke test (`--quick`), not a result" in md and "Overhead (smoke test, `--quick`: not a result)" in md
    assert "**Overhead:" not in md


def test_only_a_full_run_on_quiet_rounds_reports_the_overhead_as_a_finding(quick):
    from gpt2forge.bench.report import _ablation_row, overhead_markdown

    result, _ = quick
    row = {**result["ablation"]["rows"][0], "quiet_rounds": 0}
    assert _ablation_row(row).endswith("| contended: no quiet round |")
    quiet = "\n".join(overhead_markdown({**result["overhead"], "quiet_rounds": 2}))
    contended = "\n".join(overhead_markdown({**result["overhead"], "quiet_rounds": 0}))
    assert "**Overhead:" in quiet and "contended" not in quiet
    assert "**" not in contended and "Overhead (contended: other processes kept ≥ 0.25 cores busy" in contended
    assert "indicative only" in contended


@pytest.mark.parametrize("boundary", [0, 1, 2, 37, 64, 100])
def test_largest_fitting_finds_the_boundary_in_few_tries(boundary):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= boundary

    assert largest_fitting(fits, limit=100) == boundary
    assert len(tried) <= 14


def test_bad_options_are_user_errors(capsys):
    assert cli.main(["bench", "--only", "ablation,speed"]) == 2
    assert "unknown section(s) speed" in capsys.readouterr().err
    assert cli.main(["bench", "--preset", "tiny", "--seq-len", "4096"]) == 2
    assert "exceeds the context length" in capsys.readouterr().err


def test_device_auto_picks_mps_on_a_mac(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    opts = bench.resolve_options(cli.build_parser("bench").parse_args([]))
    assert opts.device == "mps" and opts.preset == "tiny"


def test_only_the_last_row_fuses_adamw_with_the_trainers_groups():
    """The ablation's AdamW is build_optimizer's, so its fused row differs from the rows above it only where
    build_optimizer fuses; elsewhere (MPS) the row says why it is not run."""
    cpu, batch = torch.device("cpu"), (torch.zeros(1, 8, dtype=torch.long),) * 2
    optimizers = [Contender({**s, "compile": False}, "tiny", cpu, batch).optimizer for s in cumulative_settings()]
    assert [bool(o.defaults["fused"]) for o in optimizers] == [False] * 6 + [True]
    assert [g["weight_decay"] for g in optimizers[-1].param_groups] == [0.1, 0.0]
    assert optimizers[-1].defaults["betas"] == (0.9, 0.95)
    assert unavailable(STAGES[-1], cumulative_settings()[-1], cpu, quick=False) is None
    assert "build_optimizer" in unavailable(STAGES[-1], cumulative_settings()[-1], torch.device("mps"), quick=False)


def test_counts_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--steps", "0"])
    assert "must be a positive integer, got 0" in capsys.readouterr().err


def test_rows_are_compared_on_the_same_quiet_rounds():
    samples = {"a": [(100.0, 0.0), (300.0, 0.0), (110.0, None)], "b": [(50.0, 0.0), (52.0, 0.9), (54.0, 0.1)]}
    marked = same_rounds(samples)  # round 2 was contended for b, so it counts as contended for a too
    assert [spread(v)["quiet"] for v in marked.values()] == [2, 2]
    assert spread(marked["a"])["median"] == 105.0 and spread(marked["b"])["median"] == 52.0
