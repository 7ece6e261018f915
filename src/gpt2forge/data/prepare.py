"""``gpt2forge prepare``: tokenize a text source into llm.c-format shards, in parallel, resumably, with a manifest.

**The token stream.** Each document's GPT-2 tokens are *followed* by ``<|endoftext|>`` (50256), as in GPT-2's
own training data and as our sampler assumes (an empty prompt is ``<|endoftext|>``, so what follows it must be
a document start). llm.c puts the token *before* each document instead; both separate documents with one EOT.
Documents are read in the source's order (see ``sources``); empty ones are dropped.

**Shards.** The stream is cut at positions fixed by the settings alone: the first ``val_tokens`` tokens form the
validation split (shards of at most ``shard_size``), then come train shards of ``shard_size`` tokens; the last
shard is partial. Files are named like llm.c's: ``<prefix>_val_000000.bin``, ``<prefix>_train_000001.bin``, …
(the loader selects a split by ``_val_`` / ``_train_`` in the name). A document that crosses a boundary goes on
in the next shard; each shard's manifest entry records where the next one starts (``end``: a source row and a
token offset in that row's document), so output never depends on timing or on the number of workers.

**Resume and repair.** A re-run with the same settings resumes an unfinished directory byte-identically to an
uninterrupted run, and rebuilds the missing or truncated shards of a finished one (a stat and a 1 KiB read per
shard); ``prepare --verify DIR`` reads every sha256. With all shards intact, a re-run says "nothing to do".

The parts, one job each: ``flags`` (the command's options, and every command line printed), ``sources`` (where
documents come from), ``tokenize`` (worker processes, cutting the stream into shards), ``shards`` (the ``.bin``
format), ``manifest`` (``manifest.json``, read and written), ``output`` (start/resume/repair decision, the shard
writer, filesystem errors), ``repair`` (rebuild and ``--verify``); this module runs them in order.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from ..device import library_versions
from ..errors import UserError
from ..tokenizer import get_tokenizer
from .flags import DEFAULT_SHARD_SIZE, prepare_line
from .manifest import (
    MANIFEST_NAME,
    Settings,
    save_manifest,
    tokenizer_description,
    with_max_token,
    write_verify_failures,
)
from .output import ShardWriter, check_writable, open_output, save_or_explain, warn_if_short_of_space
from .repair import repair
from .shards import TOKEN_DTYPE, shard_bytes, split_globs
from .sources import Source
from .tokenize import ShardCutter, default_workers, tokenize_into


def prepare(
    source: Source,
    out: str | os.PathLike,
    *,
    text_column: str = "text",
    min_score: float | None = None,
    score_column: str = "int_score",
    max_tokens: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    val_tokens: int | None = None,
    prefix: str = "data",
    workers: int | None = None,
    overwrite: bool = False,
    vocab_dir: str | None = None,
    progress: bool = True,
    verify: bool = False,
) -> dict:
    """Tokenize ``source`` into shards in ``out`` (resuming or repairing what is there) and return the manifest.

    A complete directory is checked (headers, sizes and token counts; with ``verify``, every shard's sha256 too,
    which reads everything: 20 GB for FineWeb-Edu 10B) and its broken shards are rebuilt (see ``repair.repair``);
    nothing else is done when all are intact. Filesystem errors (a full disk, an unwritable ``out``) are one
    ``UserError`` saying what is kept; the same call then resumes.
    """
    out = Path(out)
    workers = workers or default_workers()
    if not prefix or any(bad in prefix for bad in ("/", os.sep, "_val_", "_train_")):
        raise UserError(f"--prefix {prefix!r} must be a plain file name part without '_val_' or '_train_'")
    settings = Settings(
        source=source.describe(),
        text_column=text_column,
        min_score=min_score,
        score_column=score_column if min_score is not None else None,
        max_tokens=max_tokens,
        shard_size=shard_size,
        val_tokens=shard_size if val_tokens is None else val_tokens,
        prefix=prefix,
        tokenizer=tokenizer_description(),
    )
    created = not out.exists()
    manifest, broken = open_output(out, settings, overwrite, verify=verify)
    if manifest["complete"] and not broken:
        _nothing_to_do(manifest, out, verify)
        return manifest
    check_writable(out)
    tokenizer = get_tokenizer(vocab_dir)  # built before forking, so that workers inherit it
    if tokenizer.n_vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise UserError(f"a vocabulary of {tokenizer.n_vocab:,} tokens does not fit uint16 shards")
    if manifest["complete"]:
        repair(source, out, settings, manifest, broken, workers=workers, vocab_dir=vocab_dir, progress=progress)
        return manifest
    manifest["created_by"] = library_versions()
    done = sum(s["tokens"] for s in manifest["shards"])
    start = manifest["shards"][-1]["end"] if manifest["shards"] else {"row": 0, "token": 0}
    if manifest["shards"]:
        print(f"resuming {out}: {len(manifest['shards'])} shards ({done:,} tokens) verified; "
              f"continuing at source row {start['row']:,}", file=sys.stderr)
    budget = None if max_tokens is None else max_tokens - done
    warn_if_short_of_space(out, None if budget is None else shard_bytes(budget))
    cutter = ShardCutter(settings, len(manifest["shards"]), start, budget)
    writer = ShardWriter(manifest, out)
    try:
        tokenize_into(cutter, writer.write, source, settings, start, workers=workers, vocab_dir=vocab_dir,
                      progress=progress, out=out, total=max_tokens, initial=done)
        writer.wait()
        if not manifest["shards"]:
            raise _no_documents(source, settings, out, created)
        manifest["complete"] = True
        try:
            save_or_explain(manifest, out)
        except UserError:
            manifest["complete"] = False
            raise
    finally:
        writer.close()  # a shard being written is finished and listed, even on Ctrl-C
    write_verify_failures(out, manifest, {})  # an older record of broken shards is void now
    _summary(manifest, out)
    return manifest


def _no_documents(source: Source, settings: Settings, out: Path, created: bool) -> UserError:
    """The source gave no document: say so, naming it, instead of writing an empty dataset (an ``--out`` this
    call created is removed again)."""
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()  # only if empty
    kept = ("" if settings.min_score is None
            else f", or none has {settings.score_column} ≥ {settings.min_score:g} (--min-score)")
    return UserError(f"{source.label} holds no documents: it has no rows, or every {settings.text_column!r} value is "
                     f"empty or null{kept}. Nothing was written to {out}; check the input (and --text-column)")


def _nothing_to_do(manifest: dict, out: Path, verify: bool) -> None:
    """A complete directory whose shards are intact: clear a stale ``--verify`` record, note stray files."""
    write_verify_failures(out, manifest, {})  # whatever it named was checked in full just now, and is intact
    if verify and any("max_token" not in entry for entry in manifest["shards"]):
        manifest["shards"] = [with_max_token(out, entry) for entry in manifest["shards"]]  # read anyway: record
        with contextlib.suppress(OSError):  # a read-only directory: the loader scans instead
            save_manifest(manifest, out)
    totals = manifest["totals"]
    checked = "sha256 of every shard checked" if verify else "sizes and headers checked"
    print(f"{out} is already complete ({totals['shards']} shards, {totals['tokens']:,} tokens; {checked}): nothing "
          f"to do. `{prepare_line('--verify', str(out))}` re-checks every shard's sha256.", file=sys.stderr)
    listed = {entry["file"] for entry in manifest["shards"]}
    stray = [p.name for p in split_globs(out) if p.name not in listed]
    if stray:
        print(f"note: {out} also holds {', '.join(stray)}, which {MANIFEST_NAME} does not list: training refuses "
              "the directory while they are there; move them elsewhere", file=sys.stderr)


def _summary(manifest: dict, out: Path) -> None:
    totals = manifest["totals"]
    print(f"{out}: {totals['shards']} shards, {totals['tokens']:,} tokens ({totals['val_tokens']:,} val, "
          f"{totals['train_tokens']:,} train), {totals['documents']:,} documents", file=sys.stderr)
    if totals["train_tokens"] == 0:
        print("note: no train shards: the source ended inside the validation split; lower --val-tokens",
              file=sys.stderr)
