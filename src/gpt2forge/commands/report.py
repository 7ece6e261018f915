"""``gpt2forge report RUN_DIR``: a run's curves as ``report.png`` and ``report.md`` (``eval/report.py``)."""

from __future__ import annotations

import argparse

from ..eval.report import X_LABELS, write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory holding metrics.csv (the trainer's output directory), or the "
                                         "metrics.csv itself; the report is written beside it")
    parser.add_argument("--compare", help="another run directory or metrics.csv to overlay")
    parser.add_argument("--x", choices=tuple(X_LABELS), default=None,
                        help="x axis of the plots: tokens seen (the default where logged) or step")


def run(args: argparse.Namespace) -> None:
    png, md = write_report(args.run_dir, args.compare, x=args.x)
    print(f"wrote {png} and {md}")
