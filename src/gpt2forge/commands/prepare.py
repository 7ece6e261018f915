"""``gpt2forge prepare``: tokenize a text source into llm.c-format shards (``data/prepare.py`` does the work).

The options are built from ``data/flags.py``'s table, the same one every printed ``gpt2forge prepare`` line is
spelled from."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.flags import (
    DEFAULT_CONFIG,
    DEFAULT_DATASET,
    DEFAULT_SHARD_SIZE,
    EMBEDDED_SHARD_SIZE,
    EMBEDDED_VAL_TOKENS,
    FLAGS,
    Flag,
    prepare_line,
)
from ..data.prepare import prepare
from ..data.repair import print_verification, verify
from ..data.sources import EmbeddedSource, FileSource, HubSource, Source
from ..errors import UserError
from . import positive_int, token_count

TYPES = {"count": token_count, "number": float, "workers": positive_int}


def _add(parser, flag: Flag) -> None:
    options = {"help": flag.help}
    if flag.kind == "switch":
        options["action"] = "store_true"
    else:
        options["default"] = flag.default
        options.update({"type": TYPES[flag.kind]} if flag.kind in TYPES else {})
        options.update({"nargs": "+"} if flag.kind == "paths" else {})
        options.update({"metavar": flag.metavar} if flag.metavar else {})
        options.update({"choices": flag.choices} if flag.choices else {})
    parser.add_argument(flag.option, **options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        f"Without a source option, prepares {DEFAULT_DATASET} ({DEFAULT_CONFIG}). Re-running the same command "
        f"resumes an interrupted run. Verify a directory with: {prepare_line('--verify', 'DIR')}"
    )
    source = parser.add_argument_group("source (one of)").add_mutually_exclusive_group()
    for flag in FLAGS:
        _add(source if flag.group == "source" else parser, flag)
    # Renamed: --config names a training recipe in `train`; here it was the hub config. Refused, not guessed.
    parser.add_argument("--config", dest="old_config", default=None, help=argparse.SUPPRESS)


def source_from_args(args: argparse.Namespace) -> tuple[Source, str]:
    """The source the options name, and its default shard prefix."""
    if args.old_config is not None:
        raise UserError(f"prepare's --config is now --dataset-config (the hub dataset's config, e.g. --dataset-config "
                        f"{args.old_config}); --config names a training recipe in `gpt2forge train`")
    if (args.files or args.embedded) and (args.dataset_config or args.revision):
        raise UserError("--dataset-config and --revision apply to --dataset only")
    if args.files:
        return FileSource(args.files, args.txt_unit), "local"
    if args.embedded:
        return EmbeddedSource(), "embedded"
    name = args.dataset or DEFAULT_DATASET
    config = args.dataset_config or (DEFAULT_CONFIG if name == DEFAULT_DATASET else None)
    return HubSource(name, config, args.split, args.revision), name.rstrip("/").split("/")[-1].lower()


def run(args: argparse.Namespace) -> None:
    if args.verify:
        print_verification(Path(args.verify), verify(args.verify))
        return
    if not args.out:
        example = prepare_line("--out", "data/fineweb-edu-10B")
        raise UserError(f"--out DIR is required (where the shards go), e.g. {example}")
    if args.shard_size == 0 or args.max_tokens == 0:
        raise UserError("--shard-size and --max-tokens must be at least 1")
    source, prefix = source_from_args(args)
    shard_size = args.shard_size or (EMBEDDED_SHARD_SIZE if args.embedded else DEFAULT_SHARD_SIZE)
    val_tokens = EMBEDDED_VAL_TOKENS if args.val_tokens is None and args.embedded else args.val_tokens
    prepare(
        source,
        args.out,
        text_column=args.text_column,
        min_score=args.min_score,
        score_column=args.score_column,
        max_tokens=args.max_tokens,
        shard_size=shard_size,
        val_tokens=val_tokens,
        prefix=args.prefix or prefix,
        workers=args.workers,
        overwrite=args.overwrite,
        vocab_dir=args.vocab_dir,
        progress=not args.no_progress,
    )
