"""``gpt2forge prepare``: tokenize a text source into llm.c-format shards (``data/prepare.py`` does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.prepare import (
    DEFAULT_CONFIG,
    DEFAULT_DATASET,
    DEFAULT_SHARD_SIZE,
    EMBEDDED_SHARD_SIZE,
    EMBEDDED_VAL_TOKENS,
    default_workers,
    prepare,
    print_verification,
    verify,
)
from ..data.sources import TXT_UNITS, EmbeddedSource, FileSource, HubSource, Source
from ..errors import UserError
from . import positive_int, token_count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        f"Without a source option, prepares {DEFAULT_DATASET} ({DEFAULT_CONFIG}). Re-running the same command "
        "resumes an interrupted run. Verify a directory with: gpt2forge prepare --verify DIR"
    )
    source = parser.add_argument_group("source (one of)").add_mutually_exclusive_group()
    source.add_argument("--dataset", help=f"Hugging Face hub dataset, streamed (default {DEFAULT_DATASET})")
    source.add_argument("--files", nargs="+", metavar="PATH",
                        help="local .parquet / .jsonl / .json / .txt files, globs or directories (one format)")
    source.add_argument("--embedded", action="store_true",
                        help="the corpus shipped with Python (pydoc topics + stdlib source, ~6M tokens), offline")
    parser.add_argument("--dataset-config", metavar="NAME",
                        help=f"hub dataset config (subset) (default {DEFAULT_CONFIG} for {DEFAULT_DATASET})")
    # Renamed: --config names a training recipe in `train`; here it was the hub config. Refused, not guessed.
    parser.add_argument("--config", dest="old_config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--split", default="train", help="hub dataset split (default train)")
    parser.add_argument("--revision", help="hub dataset revision (branch, tag or commit) to pin")
    parser.add_argument("--text-column", default="text", help="column holding the documents (default text)")
    parser.add_argument("--txt-unit", choices=TXT_UNITS, default="document",
                        help=".txt files: one document per file (default), per blank-line paragraph, or per line")
    parser.add_argument("--min-score", type=float,
                        help="keep rows with --score-column ≥ this (FineWeb-Edu kept int_score ≥ 3)")
    parser.add_argument("--score-column", default="int_score",
                        help="column --min-score reads (default int_score = round(score), FineWeb-Edu's)")
    parser.add_argument("--max-tokens", type=token_count,
                        help="stop after this many tokens (the last shard is partial)")
    parser.add_argument("--shard-size", type=token_count,
                        help=f"tokens per shard (default {DEFAULT_SHARD_SIZE:,}; "
                        f"{EMBEDDED_SHARD_SIZE:,} with --embedded)")
    parser.add_argument("--val-tokens", type=token_count,
                        help=f"tokens in the validation split, taken first (default one shard; "
                        f"{EMBEDDED_VAL_TOKENS:,} with --embedded)")
    parser.add_argument("--prefix",
                        help="shard file name prefix (default from the source: fineweb-edu, embedded, local)")
    parser.add_argument("--out", metavar="DIR", help="output directory, e.g. data/fineweb-edu-10B")
    parser.add_argument("--workers", type=positive_int, default=default_workers(),
                        help="tokenizer processes (default: the cores available)")
    parser.add_argument("--overwrite", action="store_true", help="delete the shards and manifest already in --out")
    parser.add_argument("--vocab-dir",
                        help="folder with GPT-2's encoder.json + vocab.bpe (default: found automatically)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verify", metavar="DIR", help="check the shards in DIR against their manifest, then exit")


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
        raise UserError("--out DIR is required (where the shards go), e.g. --out data/fineweb-edu-10B")
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
