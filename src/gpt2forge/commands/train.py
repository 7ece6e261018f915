"""``gpt2forge train``: pretrain from a TOML recipe with ``--section.key=value`` overrides (``train/trainer.py``)."""

from __future__ import annotations

import argparse
import logging

from ..config import load_config
from ..runs import format_duration
from ..train.trainer import setup_console_logging, train

log = logging.getLogger("gpt2forge.train")
ACCEPTS_OVERRIDES = True  # unknown --section.key=value options are passed through as config overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None,
                        help="recipe: a shipped name (quickstart, gpt2-124m-fineweb-edu-10b, …) or a TOML file")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="continue a run: alone, from the newest complete checkpoint of the run directory "
                             "(or start fresh if it has none); or from the given checkpoint / run directory")
    parser.epilog = ("Any config field can be overridden: --section.key=value, e.g. --optim.lr=3e-4 "
                     "--train.max_steps=100 --data.dir=data/x. Sections: model, data, optim, train, eval, checkpoint, log.")


def run(args: argparse.Namespace) -> None:
    setup_console_logging()
    config = load_config(args.config, args.overrides)
    if args.config is None:
        log.info("no --config given: using the defaults (the GPT-2 124M FineWeb-Edu recipe)")
    result = train(config, args.resume)
    if not result.stopped_by_signal:
        log.info("done: %d steps, %s of training; run directory %s", result.step, format_duration(result.elapsed_s),
                 result.run_dir)
