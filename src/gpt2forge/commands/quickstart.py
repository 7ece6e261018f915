"""``gpt2forge quickstart``: the whole pipeline in a few CPU minutes, offline (``quickstart.py``)."""

from __future__ import annotations

import argparse

from . import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="data/embedded", help="where the corpus shards go (default data/embedded)")
    parser.add_argument("--out-dir", default="out", help="parent of the run directory (default out → out/quickstart)")
    parser.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the quickstart recipe's)")
    parser.add_argument("--workers", type=positive_int, default=None, help="tokenizer processes (default: all cores)")


def run(args: argparse.Namespace) -> None:
    from ..quickstart import quickstart

    quickstart(args.data_dir, args.out_dir, args.steps, args.workers)
