import csv
import json

import numpy as np
import pytest

from gpt2forge.cli import main
from gpt2forge.data.shards import write_shard
from gpt2forge.errors import UserError
from gpt2forge.eval.baseline import unigram_loss
from gpt2forge.eval.report import build_figure, load_runs, read_metrics, run_data, write_report
from gpt2forge.runs import COLUMNS


def write_metrics(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return run_dir / "metrics.csv"


def synthetic_run(run_dir, steps=400, val=True, hellaswag=True, mfu=True, scale=1.0, every=100):
    """Rows as the trainer writes them: the untrained model's evaluation at step 0, a row per step, eval rows of
    their own every ``every`` steps."""
    rng = np.random.default_rng(0)
    none = ""
    rows = [{"step": 0, "tokens": 0, "val_loss": 10.9 if val else none,
             "hellaswag_acc": 0.25 if hellaswag else none, "hellaswag_acc_norm": 0.25 if hellaswag else none}]
    for step in range(1, steps + 1):
        loss = scale * (3.5 + 7 * np.exp(-step / 40)) + rng.normal(0, 0.05)
        ms = 5000.0 if step == 1 else 300 + rng.normal(0, 5)
        rows.append({"step": step, "tokens": step * 8192, "elapsed_s": step * 0.3, "loss": f"{loss:.4f}", "lr": 6e-4,
                     "grad_norm": 0.5, "step_ms": ms, "tokens_per_s": 8192 / ms * 1000,
                     "mfu": 0.3 * 300 / ms if mfu else none})
        if step % every == 0:
            swag = 0.25 + step / 20000 if hellaswag else none
            rows.append({"step": step, "tokens": step * 8192, "val_loss": scale * 3.6 + 100 / step if val else none,
                         "hellaswag_acc": swag, "hellaswag_acc_norm": swag})
    return rows


def write_config(run_dir, data_dir, seq_len=4, val_tokens=0, extra=""):
    """A config.toml as the trainer saves it: every section, the data directory among them."""
    (run_dir / "config.toml").write_text(
        f'name = "test"\n\n[model]\npreset = "tiny"\nvocab_size = 50257\n\n'
        f'[data]\ndir = "{data_dir}"\nshuffle = true\n\n'
        f"[optim]\nlr = 0.0006\ngrad_clip = 1.0\n\n[train]\nmax_steps = 400\nseq_len = {seq_len}\n\n"
        f"[eval]\nval_tokens = {val_tokens}\n{extra}\n[log]\ndir = \"ignored\"\n"
    )


def prepared_dir(path, source, val=None, train=None):
    """A data directory with a prepare manifest whose source is ``source`` (and shards, when given)."""
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"format": "gpt2forge-shards", "settings": {"source": source}}))
    if val is not None:
        write_shard(path / "d_val_000000.bin", np.array(val))
        write_shard(path / "d_train_000001.bin", np.array(train))
    return path


EMBEDDED = {"kind": "embedded", "python": "3.11.7", "documents": 812, "sha256": "0" * 64}
FINEWEB_EDU = {"kind": "hub", "dataset": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT", "split": "train"}
VAL = [5, 1, 2, 3, 1, 1, 2, 7, 2, 3, 4, 1, 8]  # (13 - 1) // 4 = 3 sequences of T = 4
TRAIN = [1, 1, 2, 3, 4, 5, 1, 2, 2, 9]


def figure(run_dir, compare=None, x=None):
    """The report's figure as write_report draws it, and each panel by title."""
    runs = load_runs(run_dir, compare)
    for run in runs:
        run.data = run_data(run)
    fig, notes = build_figure(runs, x)
    return {ax.get_title(): ax for ax in fig.axes}, fig, notes


def labels(ax):
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def line(ax, prefix):
    found = [line for line in ax.get_lines() if line.get_label().startswith(prefix)]
    assert len(found) == 1, (prefix, labels(ax))
    return found[0]


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
        {"step": 1, "tokens": 100, "loss": 9.0},
        {"step": 2, "tokens": 200, "loss": 8.0},
        {"step": 2, "val_loss": 8.5},  # an eval row without tokens
        {"step": 3, "tokens": 300, "loss": 7.5},
        {"step": 3, "tokens": 300, "loss": 7.0},  # re-logged after a resume
    ])
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
    assert "cpu-run: no validation loss in metrics.csv" in text
    assert "cpu-run: not logged, so not plotted: validation loss, HellaSwag, MFU" in text
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


# --------------------------------------------------------------------------------------------- panels and references


def test_a_cpu_run_gets_only_the_panels_it_has_data_for(tmp_path):
    run = tmp_path / "cpu-run"
    write_metrics(run, synthetic_run(run, hellaswag=False, mfu=False))
    panels, fig, _ = figure(run)
    assert list(panels) == ["loss", "learning rate schedule", "gradient norm", "throughput"]
    assert len(fig.axes) == 4  # a 2 × 2 grid, no empty cell
    assert panels["learning rate schedule"].get_ylabel() == "learning rate"
    assert panels["throughput"].get_ylabel() == "tokens/s"
    assert panels["loss"].get_ylabel() == "loss (nats/token)"
    train, val = line(panels["loss"], "cpu-run train"), line(panels["loss"], "cpu-run val")
    assert train.get_color() != val.get_color()
    assert line(panels["learning rate schedule"], "cpu-run").get_ydata().max() == pytest.approx(6e-4)


def test_a_gpu_run_with_hellaswag_gets_those_panels_too(tmp_path):
    run = tmp_path / "gpu-run"
    write_metrics(run, synthetic_run(run))
    write_config(run, tmp_path / "gone", extra="hellaswag_limit = 200\n")
    panels, _, notes = figure(run)
    assert list(panels) == ["loss", "HellaSwag acc_norm (first 200 of 10,042 examples)", "learning rate schedule",
                            "gradient norm", "throughput", "model FLOPs utilization"]
    swag = panels["HellaSwag acc_norm (first 200 of 10,042 examples)"]
    assert {"GPT-2 124M (OpenAI): 0.2955", "GPT-3 124M: 0.337", "chance: 0.25"} <= set(labels(swag))
    assert any("first 200 examples" in note for note in notes)
    assert line(panels["gradient norm"], "clipping threshold").get_ydata()[0] == 1.0  # optim.grad_clip of the config


def test_five_panels_leave_no_empty_cell(tmp_path):
    run = tmp_path / "cpu-hellaswag"
    write_metrics(run, synthetic_run(run, mfu=False))
    panels, fig, _ = figure(run)
    assert len(panels) == len(fig.axes) == 5
    loss = panels["loss"].get_subplotspec()
    assert loss.colspan == range(2)  # the loss panel widens over the spare cell of the 3 × 2 grid


def test_fineweb_edu_references_only_over_fineweb_edu_data(tmp_path):
    data = prepared_dir(tmp_path / "data" / "edu", FINEWEB_EDU)
    run = tmp_path / "on-edu"
    write_metrics(run, synthetic_run(run))
    write_config(run, data)
    panels, _, notes = figure(run)
    loss = panels["loss"]
    assert "GPT-2 124M (OpenAI), FineWeb-Edu val: 3.2924" in labels(loss)
    assert not any("unigram" in label or "FineWeb val" in label for label in labels(loss))
    assert not any("not drawn" in note for note in notes)
    low, high = loss.get_ylim()
    assert low < 3.2924 < high
    text = write_report(run)[1].read_text()
    assert "HuggingFaceFW/fineweb-edu (sample-10BT, train) → FineWeb-Edu (judged by the manifest's source)" in text
    assert "| val loss | 3.2924 | OpenAI GPT-2 124M checkpoint" in text and "| on-edu |" in text


def test_other_data_gets_its_unigram_baseline_on_the_runs_val_tokens_instead(tmp_path):
    data = prepared_dir(tmp_path / "data" / "stdlib", EMBEDDED, VAL, TRAIN)
    run = tmp_path / "on-stdlib"
    write_metrics(run, synthetic_run(run))
    write_config(run, data, seq_len=4, val_tokens=8)
    panels, fig, notes = figure(run)
    loss = panels["loss"]
    assert any("published GPT-2 val losses (FineWeb-Edu, FineWeb) are not drawn" in note for note in notes)
    expected = unigram_loss(data, 4, 8)
    assert expected["tokens"] == 8
    baseline = line(loss, "corpus unigram baseline")
    assert baseline.get_ydata()[0] == pytest.approx(expected["loss"])
    assert f"{expected['loss']:.3f} on 8 val tokens" in baseline.get_label()
    assert not any("GPT-2 124M" in label or "FineWeb" in label for label in labels(loss))
    low, high = loss.get_ylim()
    assert low < expected["loss"] < high
    assert "embedded corpus" in fig._suptitle.get_text()
    text = write_report(run)[1].read_text()
    assert f"| {expected['loss']:.4f} on 8 val tokens |" in text
    assert "the embedded corpus (Python 3.11.7 standard library, 812 documents) → other data: no published" in text
    assert "| val loss | 3.2924 | OpenAI GPT-2 124M checkpoint, val loss on the FineWeb-Edu val shard | " \
           "build-nanogpt `play.ipynb` | not these runs |" in text


def test_shard_directories_without_a_manifest_are_judged_by_their_name(tmp_path):
    fineweb = tmp_path / "fineweb10B"  # llm.c / modded-nanogpt: FineWeb, not FineWeb-Edu
    fineweb.mkdir()
    run = tmp_path / "llmc"
    write_metrics(run, synthetic_run(run))
    write_config(run, fineweb)
    loss = figure(run)[0]["loss"]
    assert "speedrun target (GPT-2 124M level), FineWeb val: 3.28" in labels(loss)
    assert not any("FineWeb-Edu" in label or "unigram" in label for label in labels(loss))

    edu = tmp_path / "edu_fineweb10B"  # build-nanogpt's directory
    edu.mkdir()
    write_config(run, edu)
    assert "GPT-2 124M (OpenAI), FineWeb-Edu val: 3.2924" in labels(figure(run)[0]["loss"])

    unknown = tmp_path / "shards"
    unknown.mkdir()
    write_shard(unknown / "d_val_000000.bin", np.array(VAL))
    write_shard(unknown / "d_train_000001.bin", np.array(TRAIN))
    write_config(run, unknown)
    loss = figure(run)[0]["loss"]
    assert line(loss, "corpus unigram baseline").get_ydata()[0] == pytest.approx(unigram_loss(unknown, 4, 0)["loss"])
    assert not any("FineWeb" in label for label in labels(loss))


def test_a_report_whose_data_is_gone_says_so_and_still_draws(tmp_path):
    run = tmp_path / "old-run"
    write_metrics(run, synthetic_run(run, hellaswag=False, mfu=False))
    write_config(run, tmp_path / "deleted-corpus")
    panels, fig, notes = figure(run)
    assert not any("unigram" in label or "FineWeb" in label for label in labels(panels["loss"]))
    assert any("deleted-corpus not found" in note for note in notes)
    assert "deleted-corpus not found" in fig.get_supxlabel()
    png, md = write_report(run)
    assert png.stat().st_size > 20_000
    text = md.read_text()
    assert "deleted-corpus (not found)" in text and "– (data not readable)" in text


def test_the_step_zero_evaluation_is_inside_the_axes_and_the_first_steps_do_not_flatten_the_curve(tmp_path):
    short = tmp_path / "short"  # like the quickstart: the untrained 10.9 is part of a short curve
    write_metrics(short, synthetic_run(short, steps=150, every=50))
    loss = figure(short)[0]["loss"]
    (low, high), (left, _) = loss.get_ylim(), loss.get_xlim()
    val = line(loss, "short val")
    assert val.get_xdata()[0] == 0 and left < 0  # a margin: the marker is not cut in half by the y axis
    assert low < val.get_ydata().min() and val.get_ydata().max() < high

    long = tmp_path / "long"  # the untrained loss would squash 4000 steps into a sliver: cut, and labelled
    write_metrics(long, synthetic_run(long, steps=4000, every=500))
    loss = figure(long)[0]["loss"]
    low, high = loss.get_ylim()
    assert high < 8 and low < 3.5
    assert "step 0: 10.90 ↑" in [t.get_text() for t in loss.texts]


def test_step_on_the_x_axis_on_request(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    write_metrics(run, synthetic_run(run, steps=200))
    panels, _, _ = figure(run)
    assert {ax.get_xlabel() for ax in panels.values()} == {"tokens seen"}
    assert line(panels["loss"], "run val").get_xdata().tolist() == [0, 100 * 8192, 200 * 8192]
    panels, _, _ = figure(run, x="step")
    assert {ax.get_xlabel() for ax in panels.values()} == {"step"}
    assert line(panels["loss"], "run val").get_xdata().tolist() == [0, 100, 200]

    from gpt2forge.eval.report import figure as report_figure

    drawn = []
    original = report_figure.build_figure
    monkeypatch.setattr(report_figure, "build_figure", lambda runs, x=None: drawn.append(x) or original(runs, x))
    assert main(["report", str(run), "--x", "step"]) == 0
    assert drawn == ["step"] and "report.png" in capsys.readouterr().out
    with pytest.raises(UserError, match="x must be one of"):
        write_report(run, x="time")


def test_skipped_non_finite_steps_are_marked(tmp_path):
    run = tmp_path / "spiky"
    rows = synthetic_run(run, steps=200)
    skipped = {"step": 50, "tokens": 50 * 8192, "loss": "nan", "lr": 6e-4, "grad_norm": "inf"}  # as the trainer logs it
    rows.insert(51, skipped)  # after step 50's row: the later row wins
    rows.insert(50, {"step": 49, "tokens": 49 * 8192, "loss": 4.0, "lr": 6e-4, "grad_norm": 80.0})  # a spike before
    write_metrics(run, rows)
    panels, _, _ = figure(run)
    norm = panels["gradient norm"]
    skipped = line(norm, "skipped step")
    assert skipped.get_xdata()[0] == 50 * 8192 and "1 in spiky" in skipped.get_label()
    assert norm.get_yscale() == "log"  # 0.5 … 80: a spike and the rest readable
    assert "| skipped steps (non-finite loss or grad norm) | 1 |" in write_report(run)[1].read_text()


def test_compare_names_both_runs_in_distinct_colours(tmp_path):
    write_metrics(tmp_path / "a", synthetic_run(tmp_path / "a"))
    write_metrics(tmp_path / "b", synthetic_run(tmp_path / "b", steps=300, scale=1.02))
    panels, fig, _ = figure(tmp_path / "a", tmp_path / "b")
    loss = panels["loss"]
    colours = {name: line(loss, name).get_color() for name in ("a train", "a val", "b train", "b val")}
    assert len(set(colours.values())) == 4
    assert line(loss, "b train").get_linestyle() != line(loss, "a train").get_linestyle()
    assert {"a", "b"} <= set(labels(panels["learning rate schedule"]))
    assert fig._suptitle.get_text().startswith("a vs b")


def test_several_compared_runs_and_a_report_written_elsewhere(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 1.02), ("c", 1.04)):
        write_metrics(tmp_path / name, synthetic_run(tmp_path / name, scale=scale))
    write_metrics(tmp_path / "other" / "a", synthetic_run(tmp_path / "other" / "a", scale=1.06))  # same name as a
    out = tmp_path / "reports" / "abc"
    args = ["report", str(tmp_path / "a"), "--compare", str(tmp_path / "b"), "--compare", str(tmp_path / "c"),
            str(tmp_path / "other" / "a"), "--out", str(out)]
    assert main(args) == 0
    assert f"wrote {out / 'report.png'}" in capsys.readouterr().out
    assert not (tmp_path / "a" / "report.png").exists()
    text = (out / "report.md").read_text()
    assert "| | a | b | c | a (compared 3) |" in text
    assert all(f"`{tmp_path / name / 'metrics.csv'}`" in text for name in ("b", "c", "other/a"))

    panels, fig, _ = figure(tmp_path / "a", [tmp_path / "b", tmp_path / "c", tmp_path / "other" / "a"])
    trains = [line(panels["loss"], f"{name} train") for name in ("a", "b", "c", "a (compared 3)")]
    assert len({(t.get_color(), t.get_linestyle()) for t in trains}) == 4  # each run its own colour and dashes
    assert fig._suptitle.get_text().startswith("a vs b vs c vs a (compared 3)")

    five = ["report", str(tmp_path / "a"), "--compare", *(str(tmp_path / n) for n in ("b", "c", "b", "c"))]
    assert main(five) == 2 and "at most 4 runs (the run and 3 --compare), got 5" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["report", str(tmp_path / "a"), "--out", str(tmp_path / "file")]) == 2
    assert "--out" in capsys.readouterr().err


def test_downstream_suite_and_bits_per_byte_are_drawn_and_tabled_with_their_reference(tmp_path):
    run = tmp_path / "suite-run"
    rows = synthetic_run(run)
    for row in rows:
        if row.get("val_loss") not in (None, ""):
            row["val_bpb"] = row["val_loss"] / 3.0
            row["core"] = 0.01 * row["step"] / 100
    write_metrics(run, rows)
    panels, _, notes = figure(run)
    core = panels["downstream suite (CORE-style mean)"]
    assert {"GPT-2 1.5B, DCLM CORE (another suite): 0.2565", "chance: 0"} <= set(labels(core))
    assert list(line(core, "suite-run").get_ydata()) == [0.0, 0.01, 0.02, 0.03, 0.04]
    assert any("not the same score" in note for note in notes)
    text = write_report(run)[1].read_text()
    assert f"| final val bits per byte | {(3.6 + 100 / 400) / 3:.4f} (step 400) |" in text
    assert "| final downstream CORE-style mean | 0.0400 (step 400) |" in text
    assert "| CORE | 0.2565 |" in text and "| suite-run |" in text.split("| CORE | 0.2565 |")[1].splitlines()[0]


def test_a_run_without_the_suite_gets_no_downstream_panel(tmp_path):
    run = tmp_path / "plain"
    write_metrics(run, synthetic_run(run))
    panels, _, _ = figure(run)
    assert "downstream suite (CORE-style mean)" not in panels
