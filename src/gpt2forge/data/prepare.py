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

**Speed.** The main process reads Arrow batches and sends workers tasks of many documents (~512k characters);
a worker encodes them with ``Encoding.encode_to_numpy`` (no Python int lists) and returns one uint16 array and
the document lengths. A bounded window of tasks is in flight and consumed in order, so memory stays bounded and
reading overlaps tokenizing; a writer thread writes (and fsyncs) each full shard while the next one fills.

**Resume.** ``manifest.json`` is rewritten atomically after every shard. A re-run with the same settings checks
the listed shards against their sha256, removes any later shard files, fast-forwards the source to the last
shard's end and goes on: the result is byte-identical to an uninterrupted run. Other settings are refused,
naming the options that differ.

**Repair.** A re-run on a finished directory checks every listed shard's header, size and token count (cheap: a
stat and a 1 KiB read each) and rebuilds the ones that are missing or truncated, re-tokenizing from the intact
shard before the first of them; the result is again byte-identical (see ``_repair``). Only the sha256 can see a
corruption that keeps the size, and it reads everything (20 GB for FineWeb-Edu 10B; minutes on network storage),
so a plain re-run does not compute it: ``prepare --verify DIR`` does, and records what it finds in
``verify-failures.json``, so that training refuses those shards and the plain re-run checks them in full and
rebuilds them. ``prepare(..., verify=True)`` checks every shard's sha256 on the way. With all shards intact, a
re-run says "nothing to do".

**Errors.** A full disk, an unwritable or read-only ``--out``, or an ``--out`` that is a file is one
``UserError`` naming the path, saying what was kept (every complete shard: a shard is listed only once it is
whole on disk, and a half-written one is removed) and that the same command resumes once the cause is fixed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from ..device import library_versions
from ..errors import UserError
from ..files import atomic_write_json
from ..progress import progress_bar
from ..tokenizer import BPE_SHA256, ENCODER_SHA256, EOT_TOKEN, get_tokenizer
from .shards import (
    HEADER_BYTES,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SHARD_NAME,
    TOKEN_DTYPE,
    VERIFY_FAILURES_NAME,
    ShardError,
    listed_shard_problem,
    prepare_command,
    read_header,
    read_manifest,
    read_verify_failures,
    shard_max_token,
    shard_name,
    shard_sha256,
    split_globs,
    write_shard,
    write_verify_failures,
)
from .sources import DocBatch, Source, documents

DEFAULT_DATASET, DEFAULT_CONFIG = "HuggingFaceFW/fineweb-edu", "sample-10BT"
DEFAULT_SHARD_SIZE = 100_000_000
EMBEDDED_SHARD_SIZE, EMBEDDED_VAL_TOKENS = 1_000_000, 250_000  # the embedded corpus is ~6M tokens
TASK_CHARS = 1 << 19  # text per worker task: big enough to amortise IPC, small enough to keep workers busy
EOT_PLACEMENT = "after each document"
SOURCE_OPTIONS = {"hub": "--dataset", "files": "--files", "embedded": "--embedded"}

OPTION_NAMES = {
    "text_column": "--text-column",
    "min_score": "--min-score",
    "score_column": "--score-column",
    "max_tokens": "--max-tokens",
    "shard_size": "--shard-size",
    "val_tokens": "--val-tokens",
    "prefix": "--prefix",
    "tokenizer": "the tokenizer",
    "eot": "the EOT placement",
    "dataset": "--dataset",
    "config": "--dataset-config",
    "split": "--split",
    "revision": "--revision",
    "format": "--files (format)",
    "files": "--files (paths or sizes)",
    "txt_unit": "--txt-unit",
    "python": "--embedded (another Python version)",
    "documents": "--embedded (another standard library)",
    "sha256": "--embedded (another standard library)",
}


@dataclass(frozen=True)
class Settings:
    """Everything that determines the bytes of the output; workers and batch sizes do not."""

    source: dict
    text_column: str
    min_score: float | None
    score_column: str | None
    max_tokens: int | None
    shard_size: int
    val_tokens: int
    prefix: str
    tokenizer: dict
    eot: str = EOT_PLACEMENT

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # as it reads back from the manifest (lists, not tuples)

    def shard_plan(self, index: int) -> tuple[str, int]:
        """(split, capacity) of shard ``index``: val shards up to ``val_tokens``, then train shards."""
        full_val, last_val = divmod(self.val_tokens, self.shard_size)
        if index < full_val:
            return "val", self.shard_size
        if index == full_val and last_val:
            return "val", last_val
        return "train", self.shard_size


def tokenizer_description() -> dict:
    return {"name": "gpt2", "encoder_json_sha256": ENCODER_SHA256, "vocab_bpe_sha256": BPE_SHA256, "eot_id": EOT_TOKEN}


# ---------------------------------------------------------------- workers

_vocab_dir: str | None = None
_EOT = np.array([EOT_TOKEN], dtype=np.uint32)


def _init_worker(vocab_dir: str | None) -> None:
    """Workers leave Ctrl-C to the main process (which stops them after saving what is complete) and exit
    when it dies (a killed main process would otherwise leave them waiting for work forever)."""
    global _vocab_dir
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sentinel = multiprocessing.parent_process().sentinel
    threading.Thread(target=_exit_when_ready, args=(sentinel,), daemon=True).start()
    _vocab_dir = vocab_dir
    get_tokenizer(vocab_dir)  # already built when forked; built once here when spawned


def _exit_when_ready(sentinel: int) -> None:
    wait([sentinel])  # the parent's end closes when it exits, however it exits
    os._exit(1)


def encode_task(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The token stream of some documents (each one's tokens, then EOT) as uint16, and each one's length."""
    encoding = get_tokenizer(_vocab_dir).encoding
    pieces = []
    for text in texts:  # disallowed_special=(): "<|endoftext|>" in a text is text, as with encode_ordinary
        pieces += (encoding.encode_to_numpy(text, disallowed_special=()), _EOT)
    lengths = np.fromiter((len(p) + 1 for p in pieces[::2]), dtype=np.int64, count=len(texts))
    return np.concatenate(pieces, dtype=TOKEN_DTYPE, casting="unsafe"), lengths  # ids < 50257 fit uint16


def _tasks(batches: Iterator[DocBatch], max_chars: int = TASK_CHARS) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Regroup documents into worker tasks of about ``max_chars`` characters: (source rows, texts)."""
    rows: list[int] = []
    texts: list[str] = []
    size = 0
    for batch in batches:
        for row, text in zip(batch.rows.tolist(), batch.texts, strict=True):
            rows.append(row)
            texts.append(text)
            size += len(text)
            if size >= max_chars:
                yield np.array(rows, dtype=np.int64), texts
                rows, texts, size = [], [], 0
    if texts:
        yield np.array(rows, dtype=np.int64), texts


def tokenize(
    batches: Iterator[DocBatch], pool: ProcessPoolExecutor, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(tokens, document lengths, source rows) per task, in source order, with a bounded window in flight."""
    window: deque[tuple[np.ndarray, Future]] = deque()
    for rows, texts in _tasks(batches):
        window.append((rows, pool.submit(encode_task, texts)))
        if len(window) > 2 * workers + 1:
            rows, future = window.popleft()
            yield (*future.result(), rows)
    while window:
        rows, future = window.popleft()
        yield (*future.result(), rows)


def start_pool(workers: int, vocab_dir: str | None) -> ProcessPoolExecutor:
    """Worker processes, started before any reader threads exist (fork on Linux: the tokenizer is inherited)."""
    method = "fork" if sys.platform == "linux" else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_init_worker,
                               initargs=(vocab_dir,))
    for future in [pool.submit(os.getpid) for _ in range(workers)]:
        future.result()
    return pool


# ---------------------------------------------------------------- cutting the stream into shards


@dataclass
class Shard:
    index: int
    split: str
    tokens: np.ndarray
    documents: int  # documents whose EOT is in this shard
    end: dict  # where the next shard starts: {"row": source row, "token": offset in that row's document}


class ShardCutter:
    """Cuts the token stream into shards at the positions ``Settings.shard_plan`` fixes.

    ``start`` is where the stream resumes (the previous shard's ``end``), ``budget`` the tokens still allowed.
    """

    def __init__(self, settings: Settings, first_index: int, start: dict, budget: int | None) -> None:
        self.settings, self.index, self.start, self.budget = settings, first_index, start, budget
        self.buffer: np.ndarray | None = None
        self.filled = self.documents = self.taken = 0
        self.next_row = start["row"]

    @property
    def done(self) -> bool:
        return self.budget == 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> Iterator[Shard]:
        ends = np.cumsum(lengths)
        pos = 0
        if self.start is not None:  # resuming inside a document: its first tokens are in the previous shard
            if self.start["token"] and rows[0] != self.start["row"]:
                raise UserError(f"the source changed: row {self.start['row']:,} is not where the manifest says")
            pos, self.start = self.start["token"], None
        while pos < len(tokens) and not self.done:
            if self.buffer is None:
                _, capacity = self.settings.shard_plan(self.index)
                self.buffer = np.empty(capacity if self.budget is None else min(capacity, self.budget), TOKEN_DTYPE)
            n = min(len(self.buffer) - self.filled, len(tokens) - pos)
            self.buffer[self.filled : self.filled + n] = tokens[pos : pos + n]
            self.documents += int(np.searchsorted(ends, pos + n, "right") - np.searchsorted(ends, pos, "right"))
            pos += n
            self.filled += n
            self.taken += n
            if self.budget is not None:
                self.budget -= n
            if self.filled == len(self.buffer):
                i = int(np.searchsorted(ends, pos, "right"))  # the document holding the next token
                if i < len(ends):
                    end = {"row": int(rows[i]), "token": int(pos - (ends[i] - lengths[i]))}
                else:
                    end = {"row": int(rows[-1]) + 1, "token": 0}
                yield self._cut(end)
        self.next_row = int(rows[-1]) + 1

    def finish(self) -> Shard | None:
        """The last, partial shard once the source is exhausted (None when the stream ended on a boundary)."""
        return self._cut({"row": self.next_row, "token": 0}) if self.filled else None

    def _cut(self, end: dict) -> Shard:
        split, _ = self.settings.shard_plan(self.index)
        shard = Shard(self.index, split, self.buffer[: self.filled], self.documents, end)
        self.index += 1
        self.buffer, self.filled, self.documents = None, 0, 0
        return shard


# ---------------------------------------------------------------- the output directory and its manifest

ENTRY_KEYS = ("file", "split", "tokens", "documents", "max_token", "sha256", "end")  # a shard entry, in order
WRITE_PROBE = ".prepare-write-test"


def _entry(entry: dict) -> dict:
    """A shard entry with its keys in one order, however it was assembled: the manifest of a resumed or
    repaired run is then byte-identical to that of an uninterrupted one."""
    return {**{key: entry[key] for key in ENTRY_KEYS if key in entry}, **entry}


def _with_max_token(out: Path, entry: dict) -> dict:
    """An older entry (written before ``max_token`` existed) completed from its shard: a cache hit right after a
    full check, which read every byte anyway."""
    if "max_token" in entry:
        return entry
    return _entry({**entry, "max_token": shard_max_token(out / entry["file"])})


def _shard_files(out: Path, prefix: str | None = None) -> list[Path]:
    """The shard files in ``out`` (of one prefix, if given), in name order."""
    found = ((p, SHARD_NAME.match(p.name)) for p in out.iterdir())
    return sorted(p for p, m in found if m and prefix in (None, m["prefix"]))


def _differences(old: dict, new: dict) -> list[str]:
    """The options whose values differ between two settings dicts, as 'option (was X, now Y)'."""

    def short(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."

    found = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "source" and old[key]["kind"] == new[key]["kind"]:
            found += _differences(old[key], new[key])
        elif key == "source":
            found.append(f"the source (was {SOURCE_OPTIONS[old[key]['kind']]}, now {SOURCE_OPTIONS[new[key]['kind']]})")
        else:
            found.append(f"{OPTION_NAMES.get(key, key)} (was {short(old.get(key))}, now {short(new.get(key))})")
    return found


def _leftovers(out: Path) -> list[Path]:
    """Temporary files of writes that were interrupted."""
    return [*out.glob("*.bin.tmp"), *out.glob(f".{MANIFEST_NAME}.*.tmp"), *out.glob(f"{WRITE_PROBE}.*.tmp"),
            *out.glob(f".{VERIFY_FAILURES_NAME}.*.tmp")]


def _remove_outputs(out: Path) -> None:
    for path in [*_shard_files(out), out / MANIFEST_NAME, out / VERIFY_FAILURES_NAME, *_leftovers(out)]:
        path.unlink(missing_ok=True)


def open_output(out: Path, settings: Settings, overwrite: bool, *, verify: bool = False) -> tuple[dict, dict]:
    """The manifest to continue, and the broken shards of a complete one (name: problem; empty when intact).

    New: an empty manifest. Unfinished (resumed): every listed shard's sha256 is checked (the tokenizing still to
    do dwarfs reading what is done), the first broken one and everything after it are removed. Complete: each
    listed shard's header, size and token count are checked (a stat and a 1 KiB read each, so that "nothing to
    do" stays instant on 100 GB); its sha256 only with ``verify``, or for the shards ``prepare --verify`` last
    found corrupted (``verify-failures.json``), which is how a same-size corruption that only a full read can see
    gets repaired by the plain command.
    """
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a directory: give a directory path (it is created)")
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            _remove_outputs(out)
        return _open_manifest(out, settings, verify)
    except OSError as e:
        if e.errno is None:
            raise
        raise _filesystem_error(e, Path(e.filename or out), out, None) from None


def _open_manifest(out: Path, settings: Settings, verify: bool) -> tuple[dict, dict]:
    manifest = read_manifest(out)
    if manifest is None:
        if _shard_files(out):
            raise UserError(
                f"{out} holds shard files but no {MANIFEST_NAME}, so they cannot be resumed; "
                "use another --out, or --overwrite to delete them"
            )
        return {"format": MANIFEST_FORMAT, "version": 1, "complete": False, "settings": settings.as_json(),
                "shards": []}, {}
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{out / MANIFEST_NAME} is not a gpt2forge prepare manifest; use another --out")
    if manifest["settings"] != settings.as_json():
        differences = "; ".join(_differences(manifest["settings"], settings.as_json()))
        raise UserError(
            f"{out} was prepared with other settings: {differences}. Use another --out, or --overwrite to replace it"
        )
    if manifest["complete"]:
        recorded = read_verify_failures(out, manifest)
        broken = {}
        for entry in manifest["shards"]:
            full = verify or entry["file"] in recorded
            problem = listed_shard_problem(out, entry, full=full)
            if problem is not None:
                broken[entry["file"]] = problem + (" (found by --verify)" if entry["file"] in recorded else "")
        return manifest, broken
    kept = []
    for entry in manifest["shards"]:
        problem = listed_shard_problem(out, entry, full=True)
        if problem is not None:
            print(f"{entry['file']} does not match the manifest: rebuilding from there ({problem})", file=sys.stderr)
            break
        kept.append(_with_max_token(out, entry))
    kept_names = {entry["file"] for entry in kept}
    for path in [*_shard_files(out, settings.prefix), *_leftovers(out)]:
        if path.name not in kept_names:
            path.unlink()  # written after the last listed shard, or a half-written temporary file
    manifest["shards"] = kept
    return manifest, {}


def _size(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError


def _shard_bytes(tokens: int) -> int:
    return HEADER_BYTES + tokens * TOKEN_DTYPE.itemsize


def _still_needed(manifest: dict) -> str:
    """The disk space the rest of a run needs, as far as its settings tell."""
    settings, done = manifest["settings"], sum(entry["tokens"] for entry in manifest["shards"])
    shard = _size(_shard_bytes(settings["shard_size"]))
    if settings["max_tokens"] is None:
        return f"one shard ({shard}) to go on, and space for the rest of the source"
    left = settings["max_tokens"] - done
    needed = left * TOKEN_DTYPE.itemsize + -(-left // settings["shard_size"]) * HEADER_BYTES
    return f"{_size(needed)} for the rest of the run (--max-tokens)"


def _filesystem_error(e: OSError, path: Path, out: Path, manifest: dict | None, *,
                      repair_needs: int | None = None) -> UserError:
    """One clear message for an operating-system error writing the output: what happened to which path, what is
    kept, and what to do. ``repair_needs``: a repair failed, which needs this many more bytes."""
    reason = f"{e.strerror or e} [{errno.errorcode.get(e.errno, e.errno)}]"
    if e.errno in (errno.EACCES, errno.EPERM):
        return UserError(f"cannot write {path}: {reason}. Choose a --out you can write to, or fix the permissions "
                         f"of {out}; then run the same command again")
    if e.errno == errno.EROFS:
        return UserError(f"cannot write {path}: {out} is on a read-only file system. Choose another --out")
    if e.errno in (errno.ENOTDIR, errno.EEXIST) and manifest is None:
        return UserError(f"cannot create --out {out}: {reason} (part of the path is a file?). Give a directory path")
    if manifest is None:
        return UserError(f"cannot use --out {out} ({path}): {reason}")
    shards = manifest["shards"]
    tokens = sum(entry["tokens"] for entry in shards)
    repair = repair_needs is not None
    if repair:
        kept = ("The shards repaired so far are complete; the others are as they were, and "
                f"{out / MANIFEST_NAME} is unchanged. ")
        again = "run the same command again: it goes on repairing"
    else:
        kept = (f"Nothing is lost: the {len(shards)} shard(s) finished so far ({tokens:,} tokens, "
                f"{_size(sum(_shard_bytes(entry['tokens']) for entry in shards))}) are complete and listed in "
                f"{out / MANIFEST_NAME}, and no half-written shard is left. ")
        again = "run the same command again: it resumes after the last complete shard"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return UserError(f"{what} holding {out}, while writing {path.name} [{errno.errorcode[e.errno]}]. {kept}"
                         f"Free at least {_size(repair_needs) if repair else _still_needed(manifest)}, then {again}")
    return UserError(f"writing {path} failed: {reason}. {kept}Fix the cause, then {again}")


def _check_writable(out: Path) -> None:
    """Fail before any tokenizing where ``out`` cannot take a file (permissions, a read-only file system)."""
    probe = out / f"{WRITE_PROBE}.{os.getpid()}.tmp"
    try:
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as e:
        if e.errno is None:
            raise
        raise _filesystem_error(e, out, out, None) from None


def _warn_if_short_of_space(out: Path, needed: int | None) -> None:
    if needed is None:
        return
    free = shutil.disk_usage(out).free
    if free < needed:
        print(f"warning: {out} has {_size(free)} free, and this run needs about {_size(needed)}: it will stop when "
              "the disk is full (keeping every complete shard; the same command then resumes)", file=sys.stderr)


class ShardWriter:
    """Writes shards in order on a background thread, so that the next shard fills while one goes to disk.

    Each shard is written (atomically, fsynced) before the manifest that lists it, so a listed shard is always
    complete on disk. At most one shard waits for the disk: ``write`` blocks until the previous one is done, and
    raises what went wrong with it (an operating-system error as a ``UserError`` saying what is kept).
    """

    def __init__(self, manifest: dict, out: Path) -> None:
        self.manifest, self.out = manifest, out
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self.pending: Future | None = None

    def write(self, shard: Shard) -> None:
        self.wait()
        self.pending = self.thread.submit(self._record, shard)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        self.thread.shutdown(wait=True)

    def _record(self, shard: Shard) -> None:
        name = shard_name(self.manifest["settings"]["prefix"], shard.split, shard.index)
        try:
            sha256 = write_shard(self.out / name, shard.tokens)
        except OSError as e:
            if e.errno is None:
                raise
            raise _filesystem_error(e, self.out / name, self.out, self.manifest) from None
        max_token = int(shard.tokens.max()) if len(shard.tokens) else None
        self.manifest["shards"].append(_entry({"file": name, "split": shard.split, "tokens": len(shard.tokens),
                                               "documents": shard.documents, "max_token": max_token,
                                               "sha256": sha256, "end": shard.end}))
        try:
            _save(self.manifest, self.out)
        except OSError as e:
            self.manifest["shards"].pop()  # on disk but not listed: a resume removes it and writes it again
            if e.errno is None:
                raise
            raise _filesystem_error(e, self.out / MANIFEST_NAME, self.out, self.manifest) from None


def _save(manifest: dict, out: Path) -> None:
    shards = manifest["shards"]
    manifest["totals"] = {
        "tokens": sum(s["tokens"] for s in shards),
        "val_tokens": sum(s["tokens"] for s in shards if s["split"] == "val"),
        "train_tokens": sum(s["tokens"] for s in shards if s["split"] == "train"),
        "documents": sum(s["documents"] for s in shards),
        "shards": len(shards),
    }
    atomic_write_json(out / MANIFEST_NAME, manifest, indent=1)


def _save_or_explain(manifest: dict, out: Path) -> None:
    """``_save``, with an operating-system error as the message saying what is kept."""
    try:
        _save(manifest, out)
    except OSError as e:
        if e.errno is None:
            raise
        raise _filesystem_error(e, out / MANIFEST_NAME, out, manifest) from None


# ---------------------------------------------------------------- the pipeline


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
    which reads everything: 20 GB for FineWeb-Edu 10B) and its broken shards are rebuilt (see ``_repair``);
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
    manifest, broken = open_output(out, settings, overwrite, verify=verify)
    if manifest["complete"] and not broken:
        _nothing_to_do(manifest, out, verify)
        return manifest
    _check_writable(out)
    tokenizer = get_tokenizer(vocab_dir)  # built before forking, so that workers inherit it
    if tokenizer.n_vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise UserError(f"a vocabulary of {tokenizer.n_vocab:,} tokens does not fit uint16 shards")
    if manifest["complete"]:
        _repair(source, out, settings, manifest, broken, workers=workers, vocab_dir=vocab_dir, progress=progress)
        return manifest
    manifest["created_by"] = library_versions()
    done = sum(s["tokens"] for s in manifest["shards"])
    start = manifest["shards"][-1]["end"] if manifest["shards"] else {"row": 0, "token": 0}
    if manifest["shards"]:
        print(f"resuming {out}: {len(manifest['shards'])} shards ({done:,} tokens) verified; "
              f"continuing at source row {start['row']:,}", file=sys.stderr)
    budget = None if max_tokens is None else max_tokens - done
    _warn_if_short_of_space(out, None if budget is None else _shard_bytes(budget))
    cutter = ShardCutter(settings, len(manifest["shards"]), start, budget)
    writer = ShardWriter(manifest, out)
    try:
        _tokenize_into(cutter, writer.write, source, settings, start, workers=workers, vocab_dir=vocab_dir,
                       progress=progress, out=out, total=max_tokens, initial=done)
        writer.wait()
        manifest["complete"] = True
        try:
            _save_or_explain(manifest, out)
        except UserError:
            manifest["complete"] = False
            raise
    finally:
        writer.close()  # a shard being written is finished and listed, even on Ctrl-C
    write_verify_failures(out, manifest, {})  # an older record of broken shards is void now
    _summary(manifest, out)
    return manifest


def _tokenize_into(cutter: ShardCutter, emit, source: Source, settings: Settings, start: dict, *, workers: int,
                   vocab_dir: str | None, progress: bool, out: Path, total: int | None, initial: int) -> None:
    """Read the source from ``start``, tokenize it on worker processes, and hand each shard ``cutter`` cuts to
    ``emit``, until the cutter's budget or the source is exhausted."""
    pool = start_pool(workers, vocab_dir)
    try:
        num_rows = source.num_rows  # opens a hub dataset: after forking, before the progress bar
        with _progress(progress, out, total, initial) as bar:
            batches = documents(source, settings.text_column, start_row=start["row"], min_score=settings.min_score,
                                score_column=settings.score_column or "int_score")
            for tokens, lengths, rows in tokenize(batches, pool, workers):
                taken = cutter.taken
                for shard in cutter.add(tokens, lengths, rows):
                    emit(shard)
                bar.update(cutter.taken - taken)
                _estimate_total(bar, num_rows, total, rows)
                if cutter.done:
                    break
            last = cutter.finish()
            if last is not None:
                emit(last)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _nothing_to_do(manifest: dict, out: Path, verify: bool) -> None:
    """A complete directory whose shards are intact: clear a stale ``--verify`` record, note stray files."""
    write_verify_failures(out, manifest, {})  # whatever it named was checked in full just now, and is intact
    if verify and any("max_token" not in entry for entry in manifest["shards"]):
        manifest["shards"] = [_with_max_token(out, entry) for entry in manifest["shards"]]  # read anyway: record
        with contextlib.suppress(OSError):  # a read-only directory: the loader scans instead
            _save(manifest, out)
    totals = manifest["totals"]
    checked = "sha256 of every shard checked" if verify else "sizes and headers checked"
    print(f"{out} is already complete ({totals['shards']} shards, {totals['tokens']:,} tokens; {checked}): nothing "
          f"to do. `gpt2forge prepare --verify {out}` re-checks every shard's sha256.", file=sys.stderr)
    listed = {entry["file"] for entry in manifest["shards"]}
    stray = [p.name for p in split_globs(out) if p.name not in listed]
    if stray:
        print(f"note: {out} also holds {', '.join(stray)}, which {MANIFEST_NAME} does not list: training refuses "
              "the directory while they are there; move them elsewhere", file=sys.stderr)


def _repair(source: Source, out: Path, settings: Settings, manifest: dict, broken: dict[str, str], *, workers: int,
            vocab_dir: str | None, progress: bool) -> None:
    """Rebuild the broken shards of a complete directory, byte-identical to the originals.

    The token stream is sequential, so it is re-tokenized from the end of the last intact shard before the first
    broken one (the ``end`` the manifest records, as a resume does) up to the last broken one. Broken shards are
    rewritten (atomically); the intact ones in between are only compared, and so are the rebuilt ones before they
    are written: a source that no longer gives the recorded sha256 is refused, leaving every file as it was,
    instead of mixing two versions of the data. Shards after the last broken one are not touched. The manifest
    changes only where an older one lacked ``max_token``.
    """
    entries = manifest["shards"]
    misplaced = [e["file"] for i, e in enumerate(entries) if e["file"] != shard_name(settings.prefix, e["split"], i)]
    if misplaced:
        raise UserError(f"{out / MANIFEST_NAME} lists shards out of order ({', '.join(misplaced[:3])}): it cannot "
                        "guide a repair. Prepare the directory again: the same command with --overwrite")
    indices = [i for i, entry in enumerate(entries) if entry["file"] in broken]
    first, last = indices[0], indices[-1]
    start = entries[first - 1]["end"] if first else {"row": 0, "token": 0}
    budget = sum(entry["tokens"] for entry in entries[first : last + 1])
    listing = "".join(f"\n  {name}: {problem}" for name, problem in broken.items())
    print(f"repairing {out}: {len(broken)} of {len(entries)} shards are broken:{listing}\nre-tokenizing shards "
          f"{first}..{last} from source row {start['row']:,}: the broken ones are rebuilt, the others in between "
          "only compared", file=sys.stderr)
    _warn_if_short_of_space(out, sum(_shard_bytes(entries[i]["tokens"]) for i in indices))
    repaired: list[str] = []
    before = list(entries)

    def rebuilt(shard: Shard) -> None:
        entry = entries[shard.index]
        if len(shard.tokens) != entry["tokens"] or shard_sha256(shard.tokens) != entry["sha256"]:
            raise UserError(
                f"cannot repair {out}: the source now gives other tokens for {entry['file']} than "
                f"{out / MANIFEST_NAME} records (sha256 differs), so it changed since {out} was prepared"
                f"{' (repaired so far: ' + ', '.join(repaired) + ')' if repaired else ''}. The other files are as "
                "they were. Prepare the directory again from scratch: the same command with --overwrite (or "
                "another --out)"
            )
        if entry["file"] in broken:
            try:
                write_shard(out / entry["file"], shard.tokens)
            except OSError as e:
                if e.errno is None:
                    raise
                needs = sum(_shard_bytes(entries[i]["tokens"]) for i in indices if entries[i]["file"] not in repaired)
                raise _filesystem_error(e, out / entry["file"], out, manifest, repair_needs=needs) from None
            repaired.append(entry["file"])
        if "max_token" not in entry:
            entries[shard.index] = _entry({**entry, "max_token": int(shard.tokens.max()) if entry["tokens"] else None})

    cutter = ShardCutter(settings, first, start, budget)
    _tokenize_into(cutter, rebuilt, source, settings, start, workers=workers, vocab_dir=vocab_dir,
                   progress=progress, out=out, total=budget, initial=0)
    if len(repaired) < len(broken):
        missing = ", ".join(name for name in broken if name not in repaired)
        raise UserError(f"cannot repair {out}: the source ended before {missing} (it changed since {out} was "
                        "prepared). Prepare the directory again from scratch: the same command with --overwrite")
    if entries != before:
        _save_or_explain(manifest, out)  # an older manifest's entries gained max_token
    write_verify_failures(out, manifest, {})
    print(f"{out}: repaired {', '.join(repaired)}; all {len(entries)} shards match {MANIFEST_NAME} again",
          file=sys.stderr)


def _estimate_total(bar, num_rows: int | None, max_tokens: int | None, rows: np.ndarray) -> None:
    """Without --max-tokens, extrapolate the total from the rows read, where the source knows its size."""
    if max_tokens is None and bar.n and num_rows:
        bar.total = int(bar.n * num_rows / (int(rows[-1]) + 1))


def _progress(enabled: bool, out: Path, total: int | None, initial: int):
    return progress_bar(total=total, initial=initial, unit="tok", unit_scale=True, desc=f"prepare {out.name}",
                        smoothing=0.05, enabled=enabled)


def _summary(manifest: dict, out: Path) -> None:
    totals = manifest["totals"]
    print(f"{out}: {totals['shards']} shards, {totals['tokens']:,} tokens ({totals['val_tokens']:,} val, "
          f"{totals['train_tokens']:,} train), {totals['documents']:,} documents", file=sys.stderr)
    if totals["train_tokens"] == 0:
        print("note: no train shards: the source ended inside the validation split; lower --val-tokens",
              file=sys.stderr)


# ---------------------------------------------------------------- verify


def verify(directory: str | os.PathLike, *, record: bool = True) -> list[tuple[str, str | None]]:
    """Check every shard of a prepared directory: (file name, problem or None), manifest problems included.

    With a manifest, each listed shard's header, size, token count and sha256 are checked, and shard files it
    does not list are problems (training refuses them). Without one, headers and sizes only. With ``record``,
    the listed shards found broken are written to ``verify-failures.json`` (cleared when none are): training
    refuses them until they are repaired, and a re-run of ``prepare`` checks them in full and rebuilds them.
    """
    out = Path(directory)
    if not out.is_dir():
        raise UserError(f"--verify {out}: no such directory")
    try:
        manifest = read_manifest(out)
    except ShardError as e:
        return [(MANIFEST_NAME, str(e))]
    results: list[tuple[str, str | None]] = []
    if manifest is not None and manifest.get("format") != MANIFEST_FORMAT:
        results.append((MANIFEST_NAME, "not a gpt2forge prepare manifest: headers and sizes only"))
        manifest = None
    files = _shard_files(out)
    listed = {entry["file"]: entry for entry in manifest["shards"]} if manifest else {}
    for name, entry in listed.items():
        results.append((name, listed_shard_problem(out, entry, full=True)))
    if record and manifest is not None:
        write_verify_failures(out, manifest, {name: problem for name, problem in results if problem})
    for path in files:
        if path.name in listed:
            continue
        try:
            read_header(path)
            problem = f"not listed in {MANIFEST_NAME} (left by an interrupted run?)" if manifest else None
        except ShardError as e:
            problem = str(e)
        results.append((path.name, problem))
    if manifest is not None and not manifest["complete"]:
        results.append((MANIFEST_NAME, "preparation is not finished: run the same prepare command again"))
    if not files and not listed:
        results.append((str(out), "no shard files (*_val_*.bin / *_train_*.bin)"))
    return results


def print_verification(out: Path, results: list[tuple[str, str | None]]) -> None:
    manifest_note = "" if (out / MANIFEST_NAME).is_file() else f" (no {MANIFEST_NAME}: headers and sizes only)"
    print(f"verifying {out}{manifest_note}")
    for name, problem in results:
        print(f"  {'OK  ' if problem is None else 'FAIL'}  {name}" + (f": {problem}" if problem else ""))
    failed = sum(problem is not None for _, problem in results)
    if failed:
        raise UserError(f"{out}: {failed} problem(s) found. {_what_to_do(out, results)}")
    print(f"{out}: all {len(results)} shards OK")


def _what_to_do(out: Path, results: list[tuple[str, str | None]]) -> str:
    """The commands that fix what ``verify`` found."""
    try:
        manifest = read_manifest(out)
    except ShardError:
        manifest = None
    if manifest is None or manifest.get("format") != MANIFEST_FORMAT:
        return ("Without a gpt2forge manifest nothing here can rebuild them: download or make the broken files "
                "again (or prepare the data with `gpt2forge prepare`)")
    listed = {entry["file"] for entry in manifest["shards"]}
    broken = [name for name, problem in results if problem and name in listed]
    stray = [name for name, problem in results if problem and name not in listed and name != MANIFEST_NAME]
    command = prepare_command(manifest["settings"], out)
    advice = []
    if not manifest["complete"]:
        advice.append(f"Finish it (broken shards are rebuilt on the way) with the command that made it:\n  {command}")
    elif broken:
        advice.append(f"Repair it with the command that made it: it re-checks the {len(broken)} broken shard(s) "
                      f"in full, rebuilds them and keeps the others:\n  {command}")
    if stray and manifest["complete"]:
        advice.append(f"Move {', '.join(stray)} out of {out}: {MANIFEST_NAME} does not list them (training "
                      "refuses the directory while they are there)")
    return "\n".join(advice)
