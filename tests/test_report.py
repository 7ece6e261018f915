import csv

import numpy as np
import pytest

from gpt2forge.cli import main
from gpt2forge.errors import UserError
from gpt2forge.eval.report import read_metrics, write_report
from gpt2forge.train.metrics import COLUMNS


def write_metrics(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return run_dir / "metrics.csv"


def synthetic_run(run_dir, steps=400, val=True, hellaswag=True, mfu=True, scale=1.0):
    """Rows as the trainer writes them: a row per step, eval rows of their own every 100 steps."""
    rng = np.random.default_rng(0)
    rows = []
    for step in range(1, steps + 1):
        loss = scale * (3.5 + 7 * np.exp(-step / 40)) + rng.normal(0, 0.05)
        ms = 5000.0 if step == 1 else 300 + rng.normal(0, 5)
        row = dict(step=step, tokens=step * 8192, elapsed_s=step * 0.3, loss=f"{loss:.4f}", lr=6e-4, grad_norm=0.5,
                   step_ms=ms, tokens_per_s=8192 / ms * 1000, mfu=0.3 * 300 / ms if mfu else "")  # fmt: skip
        rows.append(row)
        if step % 100 == 0:
            swag = 0.25 + step / 20000 if hellaswag else ""
            rows.append(dict(step=step, val_loss=scale * 3.6 + 100 / step if val else "",
                             hellaswag_acc=swag, hellaswag_acc_norm=swag))  # fmt: skip
    return rows


def test_report_renders_png_and_markdown_with_the_numbers(tmp_path):
    run = tmp_path / "gpt2-124m"
    rows = synthetic_run(run)
    rows.append({**rows[-2], "loss": "3.3333"})  # a resumed run re-logs step 400: the later row wins
    write_metrics(run, rows)
    (run / "config.toml").write_text("[train]\nlr = 0.0006\nmax_steps = 400\n")
    png, md = write_report(run)

    assert png == run / "report.png" and md == run / "report.md"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 1200 and height >= 800
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert pixels.std() > 0.05  # something was drawn

    text = md.read_text()
    assert "| final train loss | 3.3333 (step 400) |" in text
    assert "| final val loss | 3.8500 (step 400) |" in text  # 3.6 + 100/400
    assert "| best val loss | 3.8500 (step 400) |" in text
    assert "| best HellaSwag acc_norm | 0.2700 (step 400) |" in text
    assert "| tokens seen | 3.28M |" in text
    assert "| wall time | 2m00s |" in text  # 400 steps of 0.3 s, as the trainer's console prints durations
    mean_tps = np.mean([r["tokens_per_s"] for r in rows[:-1] if "tokens_per_s" in r and r["step"] > 1])
    assert f"| mean tokens/s (first step excluded) | {mean_tps / 1e3:.3g}K |" in text
    assert "| mean MFU (first step excluded) | 30.0% |" in text
    for reference in ("3.2924", "0.2955", "0.337", "build-nanogpt `hellaswag.py` docstring", "~3.07 (approx.)"):
        assert reference in text
    assert "max_steps = 400" in text and "![training curves](report.png)" in text


def test_steps_merge_field_by_field_and_missing_tokens_are_interpolated(tmp_path):
    path = write_metrics(tmp_path, [
        dict(step=1, tokens=100, loss=9.0),
        dict(step=2, tokens=200, loss=8.0),
        dict(step=2, val_loss=8.5),  # an eval row without tokens
        dict(step=3, tokens=300, loss=7.5),
        dict(step=3, tokens=300, loss=7.0),  # re-logged after a resume
    ])  # fmt: skip
    with open(path, "a") as f:
        f.write("4,400,1.2,6.")  # a crash mid-line: the half-written row keeps what parses
    m = read_metrics(path)
    assert m["step"].tolist() == [1, 2, 3, 4]
    assert m["loss"][:3].tolist() == [9.0, 8.0, 7.0]
    assert m["val_loss"][1] == 8.5 and np.isnan(m["val_loss"][[0, 2, 3]]).all()
    assert m["tokens"].tolist() == [100, 200, 300, 400]


def test_compare_overlays_another_run(tmp_path, capsys):
    write_metrics(tmp_path / "baseline", synthetic_run(tmp_path / "baseline"))
    other = write_metrics(tmp_path / "longer-warmup", synthetic_run(tmp_path / "longer-warmup", steps=300, scale=1.02))
    assert main(["report", str(tmp_path / "baseline"), "--compare", str(other)]) == 0
    assert "report.png" in capsys.readouterr().out
    text = (tmp_path / "baseline" / "report.md").read_text()
    assert "| | baseline | longer-warmup |" in text
    assert "| steps logged (last step) | 400 | 300 |" in text


def test_a_metrics_csv_path_reports_beside_it(tmp_path, capsys):
    metrics = write_metrics(tmp_path / "run", synthetic_run(tmp_path / "run", steps=200))
    assert main(["report", str(metrics)]) == 0
    assert f"wrote {tmp_path / 'run' / 'report.png'}" in capsys.readouterr().out
    assert "# Run report: run" in (tmp_path / "run" / "report.md").read_text()


def test_a_run_without_evals_or_mfu_still_reports(tmp_path):
    run = tmp_path / "cpu-run"
    write_metrics(run, synthetic_run(run, val=False, hellaswag=False, mfu=False))
    png, md = write_report(run)
    assert png.stat().st_size > 20_000
    text = md.read_text()
    assert "cpu-run: no validation loss in metrics.csv" in text and "no HellaSwag results" in text
    assert "| final val loss | – |" in text and "| mean MFU (first step excluded) | – |" in text


def test_unusable_inputs_get_clear_messages(tmp_path, capsys):
    with pytest.raises(UserError, match="does not exist"):
        write_report(tmp_path / "nowhere")
    (tmp_path / "no-metrics").mkdir()
    with pytest.raises(UserError, match="has no metrics.csv"):
        write_report(tmp_path / "no-metrics")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.csv").write_text("")
    with pytest.raises(UserError, match="is empty"):
        write_report(tmp_path / "empty")
    write_metrics(tmp_path / "header-only", [])
    with pytest.raises(UserError, match="header but no rows"):
        write_report(tmp_path / "header-only")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "metrics.csv").write_text("epoch,acc\n1,0.5\n")
    assert main(["report", str(tmp_path / "foreign")]) == 2
    assert "no 'step' column" in capsys.readouterr().err
