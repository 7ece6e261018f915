"""``gpt2forge report RUN_DIR``: a run's curves, against the numbers that apply to its data, as ``report.png``
and ``report.md``.

Reads ``RUN_DIR/metrics.csv`` as the trainer writes it: a row per logged step, evaluations in rows of their
own (same step, train fields empty). Rows of one step are merged field by field, the last non-empty value
winning, so eval rows join their step and a resumed run's re-logged steps replace the old ones. A step whose
loss or gradient norm was logged as non-finite was skipped by the trainer; the plots mark it.

**What is drawn.** A panel per thing the run logged, nothing else: loss (train and val), HellaSwag, learning
rate, gradient norm, throughput, MFU (GPUs only). **Against what.** The run's ``config.toml`` names its data
directory (``[data] dir``), whose ``manifest.json`` says where the text came from. Published val losses
(``REFERENCES``) are drawn only over runs on the data they were measured on (FineWeb-Edu, or FineWeb for the
llm.c/speedrun numbers); a directory without a manifest (llm.c's shards) is judged by its name. On any other
data the reference is the corpus's own unigram baseline (``eval.baseline``), measured on the run's val tokens.
HellaSwag references and chance apply to every run that logged HellaSwag.

One module per thing drawn: ``loss``, ``evals`` (HellaSwag), ``training`` (learning rate, gradient norm,
throughput, MFU), ``markdown`` (the table and its footnotes); ``figure`` lays the panels out, ``style`` is their
shared look, ``runs`` reads a run and its data, ``references`` holds the published numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...errors import UserError
from .figure import build_figure, pick_x, render_png
from .markdown import render_markdown
from .references import REFERENCES, Reference
from .runs import Run, load_run, load_runs, read_metrics, run_data
from .style import X_LABELS

__all__ = ["REFERENCES", "X_LABELS", "Reference", "Run", "build_figure", "load_run", "load_runs", "read_metrics",
           "run_data", "write_report"]


def write_report(
    run: str | os.PathLike, compare: str | os.PathLike | list | None = None, *, x: str | None = None,
    out: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.md`` into ``out`` (created if needed; default: beside the run's
    metrics.csv; ``run`` is its directory or the file itself); ``compare`` overlays other runs or metrics.csv
    files (one path or a list); ``x`` is "tokens" (the default where logged) or "step"."""
    runs = load_runs(run, compare)
    pick_x(runs, x)  # a bad choice fails before the data is read
    for r in runs:
        r.data = run_data(r)
    out_dir = runs[0].metrics_path.parent if out is None else Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file: give a directory (report.png and report.md go into it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    png, md = out_dir / "report.png", out_dir / "report.md"
    notes = render_png(runs, png, x)
    md.write_text(render_markdown(runs, png.name, notes))
    return png, md
