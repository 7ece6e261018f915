"""The flags of ``gpt2forge prepare``, in one table: ``commands/prepare.py`` builds its argparse options from it,
and every ``gpt2forge prepare ...`` line the library prints is spelled from it (``prepare_line``, ``prepare_command``,
``missing_data_hint``), so a renamed flag is renamed in the hints too. ``tests/test_printed_commands.py`` parses
every printed command with the real parser.

Plain data, no argparse: the data layer prints commands, and only ``commands/`` parses them.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .manifest import MANIFEST_NAME

DEFAULT_DATASET, DEFAULT_CONFIG = "HuggingFaceFW/fineweb-edu", "sample-10BT"
DEFAULT_SHARD_SIZE = 100_000_000
EMBEDDED_SHARD_SIZE, EMBEDDED_VAL_TOKENS = 1_000_000, 250_000  # the embedded corpus is ~6M tokens
TXT_UNITS = ("document", "paragraph", "line")
PROGRAM = ("gpt2forge", "prepare")


@dataclass(frozen=True)
class Flag:
    """One option of ``gpt2forge prepare``."""

    option: str
    help: str
    kind: str = "text"  # how it is read: text, count (1e8, 250K, 100M), number, workers (≥ 1), switch, paths
    default: object = None
    setting: str | None = None  # the manifest setting it decides ("max_tokens", "source.config"); None: none
    spelled: str = "changed"  # when the command that made a directory names it: "always", or where not ``default``
    source: str | None = None  # the source kind it selects ("hub", "files", "embedded") or applies to; None: any
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    group: str | None = None  # "source": one of the mutually exclusive source options


FLAGS = (
    Flag("--dataset", f"Hugging Face hub dataset, streamed (default {DEFAULT_DATASET})", setting="source.dataset",
         spelled="always", source="hub", group="source"),
    Flag("--files", "local .parquet / .jsonl / .json / .txt files, globs or directories (one format)", kind="paths",
         setting="source.files", spelled="always", source="files", metavar="PATH", group="source"),
    Flag("--embedded", "the corpus shipped with Python (pydoc topics + stdlib source, ~6M tokens), offline",
         kind="switch", source="embedded", group="source"),
    Flag("--dataset-config", f"hub dataset config (subset) (default {DEFAULT_CONFIG} for {DEFAULT_DATASET})",
         setting="source.config", source="hub", metavar="NAME"),
    Flag("--split", "hub dataset split (default train)", default="train", setting="source.split", source="hub"),
    Flag("--revision", "hub dataset revision (branch, tag or commit) to pin", setting="source.revision",
         source="hub"),
    Flag("--text-column", "column holding the documents (default text)", default="text", setting="text_column"),
    Flag("--txt-unit", ".txt files: one document per file (default), per blank-line paragraph, or per line",
         default="document", setting="source.txt_unit", source="files", choices=TXT_UNITS),
    Flag("--min-score", "keep rows with --score-column ≥ this (FineWeb-Edu kept int_score ≥ 3)", kind="number",
         setting="min_score"),
    Flag("--score-column", "column --min-score reads (default int_score = round(score), FineWeb-Edu's)",
         default="int_score", setting="score_column"),
    Flag("--max-tokens", "stop after this many tokens (the last shard is partial)", kind="count",
         setting="max_tokens"),
    Flag("--shard-size", f"tokens per shard (default {DEFAULT_SHARD_SIZE:,}; {EMBEDDED_SHARD_SIZE:,} with --embedded)",
         kind="count", setting="shard_size", spelled="always"),
    Flag("--val-tokens", "tokens in the validation split, taken first (default one shard; "
         f"{EMBEDDED_VAL_TOKENS:,} with --embedded)", kind="count", setting="val_tokens", spelled="always"),
    Flag("--prefix", "shard file name prefix (default from the source: fineweb-edu, embedded, local)",
         setting="prefix", spelled="always"),
    Flag("--out", "output directory, e.g. data/fineweb-edu-10B", metavar="DIR"),
    Flag("--workers", "tokenizer processes (default: the cores available)", kind="workers"),
    Flag("--overwrite", "delete the shards and manifest already in --out", kind="switch"),
    Flag("--vocab-dir", "folder with GPT-2's encoder.json + vocab.bpe (default: found automatically)"),
    Flag("--no-progress", "no progress bar", kind="switch"),
    Flag("--verify", "check the shards in DIR against their manifest, then exit", metavar="DIR"),
)
BY_OPTION = {flag.option: flag for flag in FLAGS}
# The settings of a manifest, by the option that decides them: how a refused resume names what differs.
OPTION_NAMES = {
    **{flag.setting.split(".")[-1]: flag.option for flag in FLAGS if flag.setting},
    "tokenizer": "the tokenizer",
    "eot": "the EOT placement",
    "format": "--files (format)",
    "files": "--files (paths or sizes)",
    "python": "--embedded (another Python version)",
    "documents": "--embedded (another standard library)",
    "sha256": "--embedded (another standard library)",
}
SOURCE_OPTIONS = {flag.source: flag.option for flag in FLAGS if flag.group == "source"}  # kind: its option


def format_count(n: int) -> str:
    """A token count as the ``count`` flags read it back, short where exact: 100M, 250K, 1234."""
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def prepare_line(*args: str) -> str:
    """``gpt2forge prepare ARGS`` as a shell line; an option the table does not know is a bug, caught here."""
    unknown = [a for a in args if a.startswith("--") and a.split("=")[0] not in BY_OPTION]
    if unknown:
        raise AssertionError(f"not an option of gpt2forge prepare: {', '.join(unknown)}")
    return " ".join(a if a.startswith("FILES...") else shlex.quote(a) for a in (*PROGRAM, *args))


def _files_option(files: list[str], directory: Path) -> list[str]:
    """``--files`` arguments naming these files: their common folder where it holds exactly them, in order."""
    paths = [Path(f) for f in files]
    if len(paths) > 1:
        try:
            from .sources import resolve_files  # only on this error path: it imports pyarrow

            common = Path(os.path.commonpath(paths))
            if common.is_dir() and resolve_files([str(common)]) == paths:
                return [str(common)]
        except (UserError, OSError, ValueError):
            pass
    if len(paths) <= 6:
        return [str(p) for p in paths]
    return [f"FILES... (the {len(paths)} files under settings.source.files in {directory / MANIFEST_NAME})"]


def _setting(settings: dict, path: str):
    value = settings
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def prepare_command(settings: dict, out: str | os.PathLike) -> str:
    """The ``gpt2forge prepare`` command line that (re)makes ``out`` with a manifest's ``settings``: the
    command that resumes an interrupted run and repairs broken shards. Every option that decides the bytes
    is spelled out where its default could differ, so it matches whatever defaults the original command relied on."""
    try:
        kind = settings["source"]["kind"]
        args: list[str] = []
        for flag in FLAGS:
            if flag.source not in (None, kind) or (flag.setting is None and flag.source is None):
                continue
            value = True if flag.kind == "switch" else _setting(settings, flag.setting)
            if value is None or (flag.spelled == "changed" and value == flag.default):
                continue
            if flag.kind == "switch":
                args.append(flag.option)
            elif flag.kind == "paths":
                args += [flag.option, *_files_option([f["path"] for f in value], Path(out))]
            else:
                args += [flag.option, format_count(value) if flag.kind == "count" else str(value)]
    except (KeyError, TypeError, AttributeError):
        return (f"(unknown: the settings in {Path(out) / MANIFEST_NAME} are unreadable; prepare it again with the "
                "options it was first made with and --overwrite)")
    return prepare_line(*args, "--out", str(out))


def missing_data_hint(directory: str | os.PathLike) -> str:
    """How to make a data directory that does not exist yet. A directory named like the embedded corpus's gets
    the offline command (seconds), not ``prepare``'s default (FineWeb-Edu: hours and ~20 GB of shards)."""
    out = str(directory)
    embedded = prepare_line("--embedded", "--out", out)
    if "embedded" in Path(out).name:
        return (f"create it with `{embedded}` (the corpus shipped with Python: offline, seconds), or run "
                "`gpt2forge quickstart`, which prepares it and trains")
    return (f"create it with `{prepare_line('--out', out)}` ({DEFAULT_DATASET} {DEFAULT_CONFIG}: a download of hours, "
            f"~20 GB of shards), `{prepare_line('--files', 'PATH', '--out', out)}` from local files, or "
            f"`{embedded}` (the small corpus shipped with Python, offline)")
