"""``report.md``: the summary table of each run, the notes on what was not logged or drawn, the reference numbers
and which runs they apply to, and each run's config."""

from __future__ import annotations

from datetime import datetime, timezone

from ...runs import format_duration
from .references import FAMILY_NAMES, METRIC_NAMES, REFERENCES, applies
from .runs import Run, human, summary


def _cell(value, fmt) -> str:
    if value is None:
        return "–"
    if isinstance(value, tuple):
        return f"{fmt(value[0])} (step {value[1]:,})"
    return fmt(value)


def _baseline_cell(run: Run) -> str:
    if run.data is None:
        return "– (data unknown)"
    b = run.data.baseline
    if b is None:
        if run.data.family:
            return f"– (not computed: published {FAMILY_NAMES[run.data.family]} references apply)"
        return "– (data not readable)"
    counted = f", frequencies from the first {human(b['train_tokens_counted'])} train tokens" if b["capped"] else ""
    return f"{b['loss']:.4f} on {human(b['tokens'])} val tokens{counted}"


def _data_cell(run: Run) -> str:
    if run.data is None:
        return "unknown (no config.toml)"
    d = run.data
    if d.dir is None:
        return d.description
    verdict = FAMILY_NAMES[d.family] if d.family else "other data: no published val loss applies"
    return f"`{d.dir}`: {d.description} → {verdict} (judged by {d.basis})"


def render_markdown(runs: list[Run], png_name: str, notes: list[str]) -> str:
    stats = [summary(r) for r in runs]
    four = "{:.4f}".format
    rows = [
        ("steps logged (last step)", "steps", lambda v: f"{v:,}"),
        ("tokens seen", "tokens", human),
        ("wall time", "elapsed_s", format_duration),
        ("final train loss", "final_loss", four),
        ("final val loss", "final_val_loss", four),
        ("best val loss", "best_val_loss", four),
        ("final val bits per byte", "final_val_bpb", four),
        ("final HellaSwag acc_norm", "final_hellaswag", four),
        ("best HellaSwag acc_norm", "best_hellaswag", four),
        ("final downstream CORE-style mean", "final_core", four),
        ("mean tokens/s (first step excluded)", "tokens_per_s", human),
        ("mean MFU (first step excluded)", "mfu", lambda v: f"{100 * v:.1f}%"),
        ("skipped steps (non-finite loss or grad norm)", "skipped_steps", str),
    ]
    lines = [
        f"# Run report: {runs[0].name}",
        "",
        f"From `{runs[0].metrics_path}`"
        + (", compared with " + ", ".join(f"`{r.metrics_path}`" for r in runs[1:]) if len(runs) > 1 else "")
        + f"; generated {datetime.now(timezone.utc).isoformat(timespec='seconds')}.",
        "",
        f"![training curves]({png_name})",
        "",
        "| | " + " | ".join(r.name for r in runs) + " |",
        "|---|" + "---:|" * len(runs),
        "| data | " + " | ".join(_data_cell(r) for r in runs) + " |",
    ]
    lines += [f"| {label} | " + " | ".join(_cell(s[key], fmt) for s in stats) + " |" for label, key, fmt in rows]
    lines.append("| unigram baseline (val loss of train-split token frequencies) | "
                 + " | ".join(_baseline_cell(r) for r in runs) + " |")
    absent = {"val_loss": "validation loss", "hellaswag_acc_norm": "HellaSwag", "lr": "learning rate",
              "grad_norm": "gradient norm", "tokens_per_s": "throughput", "mfu": "MFU (needs a GPU's peak FLOP/s)"}
    for run in runs:
        missing = [what for column, what in absent.items() if not run.has(column)]
        if missing:
            notes = [*notes, f"{run.name}: not logged, so not plotted: {', '.join(missing)}"]
    if notes:
        lines += ["", *[f"- {note}" for note in dict.fromkeys(notes)]]
    lines += [
        "",
        "## Reference numbers",
        "",
        ("Val losses compare only on the same data: a reference applies to a run on the data it was measured on. "
         "The unigram baseline scores the same val tokens as the run's val loss; a model that learned anything "
         "about context beats it."),
        "",
        "| metric | value | what | source | applies to |",
        "|---|---:|---|---|---|",
    ]
    for ref in REFERENCES:
        value = f"~{ref.value:g} (approx.)" if ref.approx else f"{ref.value:g}"
        metric = METRIC_NAMES[ref.metric]
        which = [r.name for r in runs if applies(ref, r)]
        lines.append(f"| {metric} | {value} | {ref.what} | {ref.source} | {', '.join(which) or 'not these runs'} |")
    for run in runs:
        if run.config_toml:
            lines += ["", f"## Config of {run.name}", "", "```toml", run.config_toml.rstrip(), "```"]
    return "\n".join(lines) + "\n"
