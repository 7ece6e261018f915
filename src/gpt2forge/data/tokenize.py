"""The token stream of ``prepare``: documents read in source order, encoded on worker processes, cut into shards.

The main process reads Arrow batches and sends workers tasks of many documents (~512k characters); a worker
encodes them with ``Encoding.encode_to_numpy`` (no Python int lists) and returns one uint16 array and the
document lengths. A bounded window of tasks is in flight and consumed in order, so memory stays bounded and
reading overlaps tokenizing. ``ShardCutter`` cuts the stream at positions fixed by the settings alone, so output
never depends on timing or on the number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..progress import progress_bar
from ..tokenizer import EOT_TOKEN, get_tokenizer
from .manifest import Settings
from .shards import TOKEN_DTYPE
from .sources import DocBatch, Source, documents

TASK_CHARS = 1 << 19  # text per worker task: big enough to amortise IPC, small enough to keep workers busy


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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


def tokenize_into(cutter: ShardCutter, emit: Callable[[Shard], None], source: Source, settings: Settings,
                  start: dict, *, workers: int, vocab_dir: str | None, progress: bool, out: Path, total: int | None,
                  initial: int) -> None:
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


def _estimate_total(bar, num_rows: int | None, max_tokens: int | None, rows: np.ndarray) -> None:
    """Without --max-tokens, extrapolate the total from the rows read, where the source knows its size."""
    if max_tokens is None and bar.n and num_rows:
        bar.total = int(bar.n * num_rows / (int(rows[-1]) + 1))


def _progress(enabled: bool, out: Path, total: int | None, initial: int):
    return progress_bar(total=total, initial=initial, unit="tok", unit_scale=True, desc=f"prepare {out.name}",
                        smoothing=0.05, enabled=enabled)
