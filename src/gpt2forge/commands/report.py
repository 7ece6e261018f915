"""``gpt2forge report RUN_DIR``: a run's curves as ``report.png`` and ``report.md`` (``eval/report.py``)."""

from __future__ import annotations

import argparse

from ..eval.report import X_LABELS, write_report
from ..eval.report.style import RUN_STYLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory holding metrics.csv (the trainer's output directory), or the "
                                         "metrics.csv itself; the report is written beside it (or into --out)")
    parser.add_argument("--compare", nargs="+", action="extend", metavar="RUN", default=[],
                        help=f"other run directories or metrics.csv files to overlay (repeatable; up to "
                             f"{len(RUN_STYLES) - 1}; default none)")
    parser.add_argument("--x", choices=tuple(X_LABELS), default=None,
                        help="x axis of the plots: tokens seen (the default where logged) or step")
    parser.add_argument("--out", metavar="DIR",
                        help="directory for report.png and report.md, created if needed (default: beside the "
                             "run's metrics.csv)")


def run(args: argparse.Namespace) -> None:
    png, md = write_report(args.run_dir, args.compare, x=args.x, out=args.out)
    print(f"wrote {png} and {md}")
