"""``gpt2forge train``: pretrain from a TOML recipe with ``--section.key=value`` overrides (``train/trainer.py``)."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys

from ..config import config_help, load_config, to_toml
from ..errors import UserError

log = logging.getLogger("gpt2forge.train")
ACCEPTS_OVERRIDES = True  # unknown --section.key=value options are passed through as config overrides
FORMATTER = argparse.RawDescriptionHelpFormatter  # the epilog is the config listing, formatted by config_help
SHORTHANDS = {"data": "data.dir", "out": "log.out_dir"}  # --data DIR = --data.dir=DIR, as in eval and quickstart


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None,
                        help="recipe: a shipped name (quickstart, gpt2-124m-fineweb-edu-10b, …) or a TOML file "
                             "(a run's config.toml, or what --print-config printed)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="continue a run: alone, from the newest complete checkpoint of the run directory (if "
                             "it has none, the run starts from step 0 with a warning: a resumable job's first "
                             "launch); or from the given checkpoint / run directory (refused if it has none)")
    parser.add_argument("--data", metavar="DIR", help="token shard directory: short for --data.dir=DIR")
    parser.add_argument("--out", metavar="DIR", help="parent of the run directory: short for --log.out_dir=DIR")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (recipe + overrides) as TOML, headed by the memory per rank "
                             "it needs by the estimate as comments, and exit without training; saved to a file, it is "
                             "a recipe: --config FILE gives the same config")
    width = max(70, min(shutil.get_terminal_size((100, 24)).columns, 120)) - 2
    parser.epilog = config_help(width)


def resolve(args: argparse.Namespace):
    """The run config from --config, the shorthands and the --section.key=value overrides."""
    overrides = list(args.overrides)
    for option, key in SHORTHANDS.items():
        value = getattr(args, option)
        if value is None:
            continue
        if any(o.removeprefix("--").split("=")[0] == key for o in overrides):
            raise UserError(f"--{option} and --{key} both given: --{option} DIR is short for --{key}=DIR; keep one")
        overrides.append(f"--{key}={value}")
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> None:
    config = resolve(args)
    if args.print_config:
        from ..train.memory_estimate import config_comments

        sys.stdout.write(config_comments(config) + to_toml(config))
        return
    from ..runs import format_duration
    from ..train.logs import setup_console_logging
    from ..train.trainer import train

    setup_console_logging()
    if args.config is None:
        log.info("no --config given: using the defaults (the GPT-2 124M FineWeb-Edu recipe)")
    result = train(config, args.resume, argv=args.argv)
    if not result.stopped_by_signal:
        log.info("done: %d steps, %s of training; run directory %s", result.step, format_duration(result.elapsed_s),
                 result.run_dir)
