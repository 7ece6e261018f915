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
naming the options that differ; a finished directory is left alone.
"""

from __future__ import annotations

import json
import multiprocessing
import os
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
from ..tokenizer import BPE_SHA256, ENCODER_SHA256, EOT_TOKEN, get_tokenizer
from .shards import (
    MANIFEST_NAME,
    SHARD_NAME,
    TOKEN_DTYPE,
    ShardError,
    file_sha256,
    read_header,
    read_manifest,
    shard_name,
    write_shard,
)
from .sources import DocBatch, Source, documents

DEFAULT_DATASET, DEFAULT_CONFIG = "HuggingFaceFW/fineweb-edu", "sample-10BT"
DEFAULT_SHARD_SIZE = 100_000_000
EMBEDDED_SHARD_SIZE, EMBEDDED_VAL_TOKENS = 1_000_000, 250_000  # the embedded corpus is ~6M tokens
TASK_CHARS = 1 << 19  # text per worker task: big enough to amortise IPC, small enough to keep workers busy
EOT_PLACEMENT = "after each document"
MANIFEST_FORMAT = "gpt2forge token shards"
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
    return [*out.glob("*.bin.tmp"), *out.glob(f".{MANIFEST_NAME}.*.tmp")]


def _remove_outputs(out: Path) -> None:
    for path in [*_shard_files(out), out / MANIFEST_NAME, *_leftovers(out)]:
        path.unlink(missing_ok=True)


def open_output(out: Path, settings: Settings, overwrite: bool) -> dict:
    """The manifest to continue: new, resumed (listed shards verified, later ones removed), or complete."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _remove_outputs(out)
    manifest = read_manifest(out)
    if manifest is None:
        if _shard_files(out):
            raise UserError(
                f"{out} holds shard files but no {MANIFEST_NAME}, so they cannot be resumed; "
                "use another --out, or --overwrite to delete them"
            )
        return {"format": MANIFEST_FORMAT, "version": 1, "complete": False, "settings": settings.as_json(),
                "shards": []}
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{out / MANIFEST_NAME} is not a gpt2forge prepare manifest; use another --out")
    if manifest["settings"] != settings.as_json():
        differences = "; ".join(_differences(manifest["settings"], settings.as_json()))
        raise UserError(
            f"{out} was prepared with other settings: {differences}. Use another --out, or --overwrite to replace it"
        )
    if manifest["complete"]:
        return manifest
    kept = []
    for entry in manifest["shards"]:
        path = out / entry["file"]
        try:
            intact = read_header(path) == entry["tokens"] and file_sha256(path) == entry["sha256"]
        except ShardError:
            intact = False
        if not intact:
            print(f"{entry['file']} does not match the manifest: rebuilding from there", file=sys.stderr)
            break
        kept.append(entry)
    kept_names = {entry["file"] for entry in kept}
    for path in [*_shard_files(out, settings.prefix), *_leftovers(out)]:
        if path.name not in kept_names:
            path.unlink()  # written after the last listed shard, or a half-written temporary file
    manifest["shards"] = kept
    return manifest


class ShardWriter:
    """Writes shards in order on a background thread, so that the next shard fills while one goes to disk.

    Each shard is written (atomically, fsynced) before the manifest that lists it, so a listed shard is always
    complete on disk. At most one shard waits for the disk: ``write`` blocks until the previous one is done.
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
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        self.thread.shutdown(wait=True)

    def _record(self, shard: Shard) -> None:
        name = shard_name(self.manifest["settings"]["prefix"], shard.split, shard.index)
        sha256 = write_shard(self.out / name, shard.tokens)
        entry = {"file": name, "split": shard.split, "tokens": len(shard.tokens), "documents": shard.documents}
        self.manifest["shards"].append({**entry, "sha256": sha256, "end": shard.end})
        _save(self.manifest, self.out)


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
) -> dict:
    """Tokenize ``source`` into shards in ``out`` (resuming what is there) and return the manifest."""
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
    manifest = open_output(out, settings, overwrite)
    if manifest["complete"]:
        totals = manifest["totals"]
        print(f"{out} is already complete ({totals['shards']} shards, {totals['tokens']:,} tokens): nothing to do. "
              f"`gpt2forge prepare --verify {out}` re-checks every shard.", file=sys.stderr)
        return manifest
    tokenizer = get_tokenizer(vocab_dir)  # built before forking, so that workers inherit it
    if tokenizer.n_vocab > np.iinfo(TOKEN_DTYPE).max + 1:
        raise UserError(f"a vocabulary of {tokenizer.n_vocab:,} tokens does not fit uint16 shards")
    manifest["created_by"] = library_versions()
    done = sum(s["tokens"] for s in manifest["shards"])
    start = manifest["shards"][-1]["end"] if manifest["shards"] else {"row": 0, "token": 0}
    if manifest["shards"]:
        print(f"resuming {out}: {len(manifest['shards'])} shards ({done:,} tokens) verified; "
              f"continuing at source row {start['row']:,}", file=sys.stderr)
    cutter = ShardCutter(settings, len(manifest["shards"]), start, None if max_tokens is None else max_tokens - done)
    pool = start_pool(workers, vocab_dir)
    writer = ShardWriter(manifest, out)
    try:
        num_rows = source.num_rows  # opens a hub dataset: after forking, before the progress bar
        with _progress(progress, out, max_tokens, done) as bar:
            batches = documents(source, text_column, start_row=start["row"], min_score=min_score,
                                score_column=score_column)
            for tokens, lengths, rows in tokenize(batches, pool, workers):
                taken = cutter.taken
                for shard in cutter.add(tokens, lengths, rows):
                    writer.write(shard)
                bar.update(cutter.taken - taken)
                _estimate_total(bar, num_rows, max_tokens, rows)
                if cutter.done:
                    break
            last = cutter.finish()
            if last is not None:
                writer.write(last)
            writer.wait()
        manifest["complete"] = True
        _save(manifest, out)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        writer.close()  # a shard being written is finished and listed, even on Ctrl-C
    _summary(manifest, out)
    return manifest


def _estimate_total(bar, num_rows: int | None, max_tokens: int | None, rows: np.ndarray) -> None:
    """Without --max-tokens, extrapolate the total from the rows read, where the source knows its size."""
    if max_tokens is None and bar.n and num_rows:
        bar.total = int(bar.n * num_rows / (int(rows[-1]) + 1))


def _progress(enabled: bool, out: Path, total: int | None, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc=f"prepare {out.name}", smoothing=0.05,
                dynamic_ncols=True, file=sys.stderr, disable=not enabled)


def _summary(manifest: dict, out: Path) -> None:
    totals = manifest["totals"]
    print(f"{out}: {totals['shards']} shards, {totals['tokens']:,} tokens ({totals['val_tokens']:,} val, "
          f"{totals['train_tokens']:,} train), {totals['documents']:,} documents", file=sys.stderr)
    if totals["train_tokens"] == 0:
        print("note: no train shards: the source ended inside the validation split; lower --val-tokens",
              file=sys.stderr)


# ---------------------------------------------------------------- verify


def verify(directory: str | os.PathLike) -> list[tuple[str, str | None]]:
    """Check every shard of a prepared directory: (file name, problem or None), manifest problems included.

    With a manifest, each listed shard's header, size, token count and sha256 are checked, and shard files it
    does not list are problems (the loader would read them). Without one, headers and sizes only.
    """
    out = Path(directory)
    if not out.is_dir():
        raise UserError(f"--verify {out}: no such directory")
    try:
        manifest = read_manifest(out)
    except ShardError as e:
        return [(MANIFEST_NAME, str(e))]
    files = _shard_files(out)
    results: list[tuple[str, str | None]] = []
    listed = {entry["file"]: entry for entry in manifest["shards"]} if manifest else {}
    for name, entry in listed.items():
        path = out / name
        try:
            count = read_header(path)
        except ShardError as e:
            results.append((name, str(e)))
            continue
        if count != entry["tokens"]:
            results.append((name, f"holds {count:,} tokens, the manifest says {entry['tokens']:,}"))
        elif file_sha256(path) != entry["sha256"]:
            results.append((name, "sha256 differs from the manifest: the file is corrupted"))
        else:
            results.append((name, None))
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
        raise UserError(f"{out}: {failed} problem(s) found")
    print(f"{out}: all {len(results)} shards OK")
