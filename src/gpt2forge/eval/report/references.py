"""The published numbers a run's curves are drawn against (REFERENCE.md), and which of them apply to a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runs import Run


@dataclass(frozen=True)
class Reference:
    metric: str  # "val_loss", "hellaswag" (acc_norm) or "core" (a centered mean over downstream tasks)
    value: float
    what: str
    source: str
    approx: bool = False  # could not be checked against a file: always shown as approximate
    plot: str | None = None  # legend label when drawn as a line on the plots
    data: str | None = None  # "fineweb-edu" / "fineweb": only runs on that data compare; None: any run


# From REFERENCE.md (repository root): every number with where it was published.
REFERENCES = (
    Reference("val_loss", 3.2924, "OpenAI GPT-2 124M checkpoint, val loss on the FineWeb-Edu val shard",
              "build-nanogpt `play.ipynb`", plot="GPT-2 124M (OpenAI), FineWeb-Edu val", data="fineweb-edu"),
    Reference("val_loss", 3.07, "build-nanogpt run, 10B tokens of FineWeb-Edu, final val loss",
              "build-nanogpt video", approx=True, data="fineweb-edu"),
    Reference("val_loss", 3.2722, "llm.c 124M, 10.26B tokens, final val loss (FineWeb val, not FineWeb-Edu)",
              "modded-nanogpt `records/track_1_short/2024-10-13_llmc`", data="fineweb"),
    Reference("val_loss", 3.28, "modded-nanogpt speedrun target (FineWeb val)", "modded-nanogpt README",
              plot="speedrun target (GPT-2 124M level), FineWeb val", data="fineweb"),
    Reference("hellaswag", 0.2955, "OpenAI GPT-2 124M, HellaSwag acc_norm (completion style, 10,042 val rows)",
              "build-nanogpt `hellaswag.py` docstring", plot="GPT-2 124M (OpenAI)"),
    Reference("hellaswag", 0.337, "GPT-3 124M (paper), HellaSwag", "build-nanogpt `play.ipynb`", plot="GPT-3 124M"),
    Reference("hellaswag", 0.4893, "OpenAI GPT-2 XL 1558M, HellaSwag acc_norm (same method)",
              "build-nanogpt `hellaswag.py` docstring"),
    Reference("hellaswag", 0.30, "build-nanogpt run, 10B tokens, HellaSwag acc_norm", "build-nanogpt video",
              approx=True),
    Reference("core", 0.2565, "OpenAI GPT-2 XL 1558M, DCLM CORE (22 few-shot tasks; our CORE-style score averages "
              "12 zero-shot tasks: the same scale, not the same score)", "nanochat leaderboard",
              plot="GPT-2 1.5B, DCLM CORE (another suite)"),
)
METRIC_NAMES = {"val_loss": "val loss", "hellaswag": "HellaSwag", "core": "CORE"}
CHANCE = 0.25  # HellaSwag has four endings
HELLASWAG_ROWS = 10042
FAMILY_NAMES = {"fineweb-edu": "FineWeb-Edu", "fineweb": "FineWeb"}


def applies(ref: Reference, run: Run) -> bool:
    """Whether a published number compares with this run: same data for val losses, any run that logged HellaSwag
    (the downstream suite) for HellaSwag (CORE)."""
    if ref.metric == "hellaswag":
        return run.has("hellaswag_acc_norm")
    if ref.metric == "core":
        return run.has("core")
    return ref.data is not None and run.data is not None and run.data.family == ref.data
