"""``gpt2forge quickstart``: the whole pipeline in a few CPU minutes, offline (``quickstart.py``)."""

from __future__ import annotations

import argparse

from . import positive_int

ACCEPTS_OVERRIDES = True  # --section.key=value options change the quickstart recipe, as in `gpt2forge train`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", metavar="DIR", default="data/embedded",
                        help="where the corpus shards go (default data/embedded)")
    parser.add_argument("--data-dir", dest="data", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spelling
    parser.add_argument("--out", metavar="DIR", default="out",
                        help="parent of the run directory (default out → out/quickstart)")
    parser.add_argument("--out-dir", dest="out", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spelling
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="training steps (default: the quickstart recipe's; short for --train.max_steps=N)")
    parser.add_argument("--workers", type=positive_int, default=None, help="tokenizer processes (default: all cores)")
    parser.epilog = ("Any setting of the quickstart recipe can be changed as in `gpt2forge train`: "
                     "--section.key=value, e.g. --train.micro_batch_size=8 (`gpt2forge train --help` lists them). "
                     "The validation loss, in the loop and in the final comparison, scores --eval.val_tokens.")


def run(args: argparse.Namespace) -> None:
    from ..quickstart import quickstart

    quickstart(args.data, args.out, args.steps, args.workers, overrides=args.overrides)
