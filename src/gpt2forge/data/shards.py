"""The token shard file: llm.c / modded-nanogpt's ``.bin`` format, written atomically and checked on read.

Layout: a header of 256 little-endian int32 (``[0]`` magic 20240520, ``[1]`` version 1, ``[2]`` token count,
the rest zero), then the tokens as little-endian uint16. Shards therefore interoperate with llm.c's tools and
with the pre-tokenized FineWeb shards those projects publish.

A prepared directory holds shards named like llm.c's, ``<prefix>_<split>_<index:06d>.bin``
(``fineweb-edu_val_000000.bin``, ``fineweb-edu_train_000001.bin``, …): readers select a split by the
``_val_`` / ``_train_`` in the name. Beside them, ``manifest.json`` records how they were made and each shard's
token count, sha256 and largest token id (``max_token``; manifests written before it existed lack it, and
readers then scan the shard instead). See ``gpt2forge.data.prepare``.

**Opening a directory for training** (``check_data_dir``) trusts nothing it can check cheaply. With a manifest
(ours): the manifest must say ``complete``; every listed shard must exist with a valid header, its size must
match its token count, and no unlisted ``*_val_*.bin`` / ``*_train_*.bin`` may lie beside them (the loader would
otherwise silently read a different dataset than the one prepared, or ignore files the user meant to add); and
shards that ``prepare --verify`` found corrupted stay refused until repaired. These are a stat and a 1 KiB read
per shard. The sha256 of every byte (20 GB for FineWeb-Edu 10B, minutes) stays ``prepare --verify``'s job.
Without a manifest (llm.c's or modded-nanogpt's published shards) each shard's header and size are still checked
as it is opened, and one warning says that nothing can tell whether shards are missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import atomic_write_json, fsync_dir

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gpt2forge token shards"
VERIFY_FAILURES_NAME = "verify-failures.json"  # written by `prepare --verify` when it finds corrupted shards
SHARD_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>val|train)_(?P<index>\d{6})\.bin$")
SPLITS = ("train", "val")

log = logging.getLogger("gpt2forge.data")


class ShardError(UserError):
    """A shard file that is missing, truncated or not in the expected format."""


def shard_name(prefix: str, split: str, index: int) -> str:
    """The llm.c-style file name of shard ``index`` (indices run on across splits: val 0, train 1, 2, …)."""
    return f"{prefix}_{split}_{index:06d}.bin"


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The ``manifest.json`` of a prepared directory, or None where there is none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path} is not valid JSON ({e}): corrupted? `prepare --overwrite` rebuilds it") from None
    except OSError as e:
        raise ShardError(f"cannot read {path}: {e.strerror or e}") from None


def shard_sha256(tokens: np.ndarray) -> str:
    """The sha256 of the file ``write_shard`` makes of these (uint16) tokens, without writing it."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    digest = hashlib.sha256(header.tobytes())
    digest.update(memoryview(np.ascontiguousarray(tokens.astype(TOKEN_DTYPE, copy=False))).cast("B"))
    return digest.hexdigest()


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """Write ``tokens`` as a shard via a temporary file, fsync and rename; return the file's sha256.

    On any failure (a full disk, say) the temporary file is removed: no half-written shard is left behind, and
    ``path`` keeps whatever it held before."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be one-dimensional, got shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > np.iinfo(TOKEN_DTYPE).max):
        raise ShardError(
            f"{path}: token ids range over [{int(tokens.min())}, {int(tokens.max())}], "
            "which does not fit uint16: shards hold GPT-2-sized vocabularies (< 65,536) only"
        )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    body = np.ascontiguousarray(tokens.astype(TOKEN_DTYPE, copy=False))
    sha256 = shard_sha256(body)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(body.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return sha256


def read_header(path: str | os.PathLike) -> int:
    """The token count of a shard, after checking magic, version and that the file size matches it."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist")
    try:
        size = path.stat().st_size
        if size < HEADER_BYTES:
            raise ShardError(f"shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte header: truncated?")
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e.strerror or e}") from None
    magic, version, count = (int(v) for v in header[:3])
    if magic != MAGIC:
        raise ShardError(f"shard {path} has magic {magic}, expected {MAGIC}: not an llm.c-format token shard")
    if version != VERSION:
        raise ShardError(
            f"shard {path} has version {version}, expected {VERSION} (uint16 GPT-2 tokens; "
            "version 2 is llm.c's uint32 Llama-3 format)"
        )
    expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if size != expected:
        raise ShardError(
            f"shard {path} is {size} bytes but its header promises {count:,} tokens ({expected} bytes): "
            "truncated or corrupted"
        )
    return count


def open_shard(path: str | os.PathLike) -> np.memmap:
    """The tokens of a checked shard, memory-mapped read-only (nothing is loaded until it is indexed)."""
    count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)  # numpy cannot map an empty region
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the largest token id of a shard

_max_tokens: dict[tuple[str, int, int], int | None] = {}  # (path, size, mtime_ns) -> largest id, per process


def _stat_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def scan_shard(path: str | os.PathLike, chunk: int = 1 << 24) -> tuple[str, int | None]:
    """(sha256 of the file, largest token id or None when empty) of a shard with a checked header, in one read."""
    path = Path(path)
    digest, top = hashlib.sha256(), None
    with open(path, "rb") as f:
        digest.update(f.read(HEADER_BYTES))
        while block := f.read(chunk - chunk % 2):
            digest.update(block)
            body = np.frombuffer(block, dtype=TOKEN_DTYPE, count=len(block) // 2)
            if body.size:
                top = max(top if top is not None else 0, int(body.max()))
    _max_tokens[_stat_key(path)] = top
    return digest.hexdigest(), top


def shard_max_token(path: str | os.PathLike) -> int | None:
    """The largest token id in a shard (None when it is empty): ``np.max`` over the memory-mapped tokens,
    about 50 ms per 100M-token shard once it is in the page cache, remembered per process."""
    path = Path(path)
    key = _stat_key(path)
    if key not in _max_tokens:
        tokens = open_shard(path)
        _max_tokens[key] = int(tokens.max()) if tokens.size else None
    return _max_tokens[key]


# ---------------------------------------------------------------- the command that made a directory


def _count(n: int) -> str:
    """A token count as ``token_count`` reads it back, short where exact: 100M, 250K, 1234."""
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


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


def prepare_command(settings: dict, out: str | os.PathLike) -> str:
    """The ``gpt2forge prepare`` command line that (re)makes ``out`` with a manifest's ``settings``: the
    command that resumes an interrupted run and repairs broken shards. Every option that decides the bytes
    is spelled out, so it matches whatever defaults the original command relied on."""
    try:
        source = settings["source"]
        args = ["gpt2forge", "prepare"]
        if source["kind"] == "hub":
            args += ["--dataset", source["dataset"]]
            if source.get("config"):
                args += ["--config", source["config"]]
            if source.get("split", "train") != "train":
                args += ["--split", source["split"]]
            if source.get("revision"):
                args += ["--revision", source["revision"]]
        elif source["kind"] == "files":
            args += ["--files", *_files_option([f["path"] for f in source["files"]], Path(out))]
            if source.get("txt_unit", "document") != "document":
                args += ["--txt-unit", source["txt_unit"]]
        else:
            args.append("--embedded")
        if settings["text_column"] != "text":
            args += ["--text-column", settings["text_column"]]
        if settings["min_score"] is not None:
            args += ["--min-score", str(settings["min_score"]), "--score-column", settings["score_column"]]
        if settings["max_tokens"] is not None:
            args += ["--max-tokens", _count(settings["max_tokens"])]
        args += ["--shard-size", _count(settings["shard_size"]), "--val-tokens", _count(settings["val_tokens"]),
                 "--prefix", settings["prefix"], "--out", str(out)]
    except (KeyError, TypeError):
        return f"gpt2forge prepare ... --out {shlex.quote(str(out))} (the command that made it)"
    return " ".join(a if a.startswith("FILES...") else shlex.quote(a) for a in args)


# ---------------------------------------------------------------- checking a directory before training


def listed_shard_problem(directory: str | os.PathLike, entry: dict, *, full: bool = False) -> str | None:
    """What is wrong with a shard that a manifest lists, or None. Cheap by default (exists, header, size, token
    count); ``full`` also compares every byte's sha256 (and so learns its largest token id on the way)."""
    path = Path(directory) / entry["file"]
    if not path.exists():
        return "missing"
    try:
        count = read_header(path)
    except ShardError as e:
        return str(e).removeprefix(f"shard {path} ")
    if count != entry["tokens"]:
        return f"holds {count:,} tokens, the manifest says {entry['tokens']:,}"
    if full:
        try:
            sha256, _ = scan_shard(path)
        except OSError as e:
            return f"cannot read it: {e.strerror or e}"
        if sha256 != entry["sha256"]:
            return "sha256 differs from the manifest: the file is corrupted"
    return None


def read_verify_failures(directory: str | os.PathLike, manifest: dict) -> dict[str, str]:
    """The listed shards that ``prepare --verify`` last found broken (name: problem), dropping records that no
    longer match the manifest (a shard since rebuilt with other contents, a directory re-prepared)."""
    path = Path(directory) / VERIFY_FAILURES_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        failures = record["shards"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # unreadable: prepare re-checks everything it would have named anyway
    sha256 = {entry["file"]: entry["sha256"] for entry in manifest["shards"]}
    return {name: f["problem"] for name, f in failures.items() if sha256.get(name) == f.get("sha256")}


def write_verify_failures(directory: str | os.PathLike, manifest: dict, failures: dict[str, str]) -> None:
    """Record (or, with no failures, clear) what ``--verify`` found, so that training refuses those shards and a
    re-run of ``prepare`` re-checks them fully and rebuilds them. Best effort: a read-only directory is left be."""
    path = Path(directory) / VERIFY_FAILURES_NAME
    sha256 = {entry["file"]: entry["sha256"] for entry in manifest["shards"]}
    try:
        if failures:
            shards = {name: {"problem": problem, "sha256": sha256[name]} for name, problem in failures.items()}
            atomic_write_json(path, {"written_by": "gpt2forge prepare --verify", "shards": shards})
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def split_globs(directory: Path) -> list[Path]:
    """Every file a reader would take for a shard: ``*_val_*.bin`` and ``*_train_*.bin``."""
    return sorted({*directory.glob("*_val_*.bin"), *directory.glob("*_train_*.bin")})


@dataclass
class DataInfo:
    """A checked data directory: each split's shards in reading order, and what its manifest says of them."""

    directory: Path
    manifest: dict | None  # None: not made by `gpt2forge prepare`, so nothing says what should be there
    shards: dict[str, list[Path]] = field(default_factory=dict)

    def paths(self, split: str) -> list[Path]:
        """The shards of ``split``, refusing a split with none."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self.shards[split]:
            return self.shards[split]
        directory = self.directory
        settings = (self.manifest or {}).get("settings", {})
        if self.manifest is not None and split == "val" and settings.get("val_tokens") == 0:
            raise UserError(f"{directory} has no val shards: it was prepared with --val-tokens 0. Prepare it "
                            "again into another --out with a validation split (e.g. --val-tokens 10M)")
        if self.manifest is not None and split == "train":
            raise UserError(f"{directory} has no train shards: the source ended inside the validation split "
                            f"(--val-tokens {settings.get('val_tokens', 0):,}); prepare it again into another "
                            "--out with a smaller --val-tokens")
        raise UserError(
            f"no {split} shards (*_{split}_*.bin) in {directory}; "
            f"create them with `gpt2forge prepare --out {directory}`"
        )

    def check_vocab(self, split: str, vocab_size: int) -> None:
        """Refuse shards of ``split`` holding a token id the model has no embedding for. The largest id of each
        shard comes from the manifest's ``max_token`` where it records one (the shard's size was checked), else
        from a scan of the memory-mapped shard (``shard_max_token``)."""
        recorded = {e["file"]: e["max_token"] for e in (self.manifest or {}).get("shards", []) if "max_token" in e}
        started, scanned = time.perf_counter(), 0
        for path in self.paths(split):
            if path.name in recorded:
                top = recorded[path.name]
            else:
                top, scanned = shard_max_token(path), scanned + 1
            if top is not None and top >= vocab_size:
                tokenizer = ((self.manifest or {}).get("settings") or {}).get("tokenizer") or {}
                made_with = (f" ({self.directory / MANIFEST_NAME} says it was made with the "
                             f"{tokenizer['name']!r} tokenizer)" if "name" in tokenizer else "")
                raise UserError(
                    f"{path} holds token id {top:,}, but the model's vocabulary has {vocab_size:,} ids "
                    f"(0..{vocab_size - 1:,}){made_with}. Either the shards were made with another tokenizer than "
                    "the model's, or the model's vocab_size is too small for this data (GPT-2's tokenizer needs "
                    f"50,257). Use shards made with the model's tokenizer, or a model with vocab_size > {top:,}"
                )
        seconds = time.perf_counter() - started
        if seconds > 5:
            log.info("scanned %d %s shards of %s for their largest token id in %.0f s (no max_token recorded)",
                     scanned, split, self.directory, seconds)


_warned_unchecked: set[str] = set()


def check_data_dir(directory: str | os.PathLike) -> DataInfo:
    """Check a data directory before anything reads it for training or evaluation (see the module docstring):
    cheap checks only, every refusal a ``UserError`` naming the directory or shard and the command that fixes it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"data directory {directory} does not exist; "
                        f"create it with `gpt2forge prepare --out {directory}`")
    manifest = read_manifest(directory)
    if manifest is not None and manifest.get("format") != MANIFEST_FORMAT:
        manifest = None  # someone else's manifest.json: nothing we can check against
    if manifest is None:
        key = str(directory.resolve())
        if key not in _warned_unchecked:
            _warned_unchecked.add(key)
            log.warning("%s has no gpt2forge %s (shards from another tool?): each shard's header and size are "
                        "checked, but not whether shards are missing or complete", directory, MANIFEST_NAME)
        found = split_globs(directory)
        return DataInfo(directory, None, {split: [p for p in found if f"_{split}_" in p.name] for split in SPLITS})
    command = prepare_command(manifest.get("settings", {}), directory)
    if not manifest.get("complete"):
        raise UserError(f"{directory} is not finished (`gpt2forge prepare` was interrupted, or is still running): "
                        f"{_progress_note(manifest)}. Training now would read only part of the data. Finish it with "
                        f"the command that made it (it resumes where it stopped):\n  {command}")
    recorded = read_verify_failures(directory, manifest)
    problems = {}
    for entry in manifest["shards"]:
        problem = listed_shard_problem(directory, entry)
        if problem is None and entry["file"] in recorded:
            problem = f"{recorded[entry['file']]} (found by `gpt2forge prepare --verify`)"
        if problem is not None:
            problems[entry["file"]] = problem
    if problems:
        listing = "\n".join(f"  {name}: {problem}" for name, problem in problems.items())
        raise ShardError(
            f"{directory} has {len(problems)} broken shard(s) that {MANIFEST_NAME} lists:\n{listing}\n"
            f"`gpt2forge prepare --verify {directory}` checks every shard; this command rebuilds the broken ones "
            f"(and keeps the others):\n  {command}"
        )
    listed = {entry["file"] for entry in manifest["shards"]}
    unlisted = [p.name for p in split_globs(directory) if p.name not in listed]
    if unlisted:
        raise UserError(
            f"{directory} holds shard files that its {MANIFEST_NAME} does not list: {', '.join(unlisted)} (copied "
            "in, or left by another run?). Training reads what the manifest lists, so they would be silently "
            "left out: move them to another directory, or delete them; to train on other shards, give them a "
            "directory of their own"
        )
    shards = {split: [directory / e["file"] for e in manifest["shards"] if e["split"] == split] for split in SPLITS}
    return DataInfo(directory, manifest, shards)


def _progress_note(manifest: dict) -> str:
    """How far an unfinished ``prepare`` got, against its plan where the settings fix one."""
    shards = manifest.get("shards", [])
    tokens = sum(entry["tokens"] for entry in shards)
    settings = manifest.get("settings", {})
    done = f"{MANIFEST_NAME} lists {len(shards)} shard(s), {tokens:,} tokens,"
    planned = settings.get("max_tokens")
    if planned is None:
        return f"{done} of the whole source (whose size is known only once it is read)"
    size, val = settings["shard_size"], min(settings["val_tokens"], planned)
    count = -(-val // size) + -(-(planned - val) // size)
    return f"{done} of the {planned:,} tokens ({count} shards) planned"
