"""Which tokens every rank reads at every step, as a pure function of the seed and the global position.

A shard of ``n`` tokens holds ``(n - 1) // T`` training sequences: sequence ``k`` is the input
``tokens[kT : kT+T]`` with targets shifted by one. An epoch visits every sequence of every shard once. With
shuffling, the shard order and the sequence order inside each shard are re-drawn each epoch from
``(seed, epoch)`` — the public runs show a periodic loss pattern when FineWeb-Edu is read in the same order
every epoch.

The global batch of step ``s`` is the sequences ``s·G … s·G+G-1`` of this endless stream (``G`` = sequences
per optimizer step), and micro-step ``m`` of rank ``r`` takes ``B`` of them at ``(m·W + r)·B``. So ranks read
disjoint data, nothing is repeated or skipped within an epoch, resuming needs only the step, and the same
global batch is the same token stream on one rank with accumulation or on many ranks without it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..models import IGNORE_INDEX
from .datadir import check_data_dir
from .shards import open_shard


def find_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The ``*_{split}_*.bin`` shards of a directory, in name order (llm.c's naming: ``fineweb_val_000000.bin``),
    after ``check_data_dir`` has checked the directory: with a manifest, exactly the shards it lists."""
    return check_data_dir(data_dir).paths(split)


class ShardSequences:
    """The sequences of a set of shards, memory-mapped: ``window(shard, k)`` is ``T + 1`` tokens."""

    def __init__(self, shards: list[Path], seq_len: int) -> None:
        self.paths = shards
        self.seq_len = seq_len
        self.tokens = [open_shard(p) for p in shards]
        counts = [(len(t) - 1) // seq_len if len(t) > seq_len else 0 for t in self.tokens]
        self.counts = np.array(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        if self.total == 0:
            sizes = ", ".join(f"{p.name}: {len(t):,}" for p, t in zip(shards, self.tokens))
            raise UserError(f"shards hold too few tokens for one sequence of {seq_len}+1 tokens ({sizes})")
        listing = "\n".join(f"{p.name}:{len(t)}" for p, t in zip(shards, self.tokens))
        self.fingerprint = hashlib.sha256(listing.encode()).hexdigest()[:16]

    def window(self, shard: int, k: int) -> np.ndarray:
        start = k * self.seq_len
        return self.tokens[shard][start : start + self.seq_len + 1]


class TokenLoader:
    """Training batches for one rank, addressable by (step, micro-step) and resumable from a state dict."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        batch_size: int,
        seq_len: int,
        *,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        vocab_size: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        """``data_dir`` is checked first (``check_data_dir``: an unfinished or broken prepared directory is
        refused); with ``vocab_size`` (the model's), shards holding a token id ≥ it are refused too.
        ``pin_memory`` (for CUDA) returns batches in page-locked memory, so ``.to(device, non_blocking=True)``
        is an asynchronous copy that never stalls the host."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.data_dir = Path(data_dir)
        self.split = split
        info = check_data_dir(data_dir)
        self.sequences = ShardSequences(info.paths(split), seq_len)
        if vocab_size is not None:
            info.check_vocab(split, vocab_size)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.seed, self.shuffle = seed, shuffle
        self.sequences_per_step = batch_size * world_size * grad_accum
        self.step, self.micro_step = 0, 0  # the next batch next_batch() returns
        self.pin_memory = pin_memory
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._permutations: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()  # the caches above are shared with the prefetch thread
        self._prefetcher: ThreadPoolExecutor | None = None
        self._pending: tuple[tuple[int, int], Future] | None = None  # (position, the batch being prepared)

    @property
    def sequences_per_epoch(self) -> int:
        return self.sequences.total

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, cumulative sequence counts in that order) of an epoch."""
        if epoch not in self._orders:
            n = len(self.sequences.counts)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._orders = {epoch: (order, np.cumsum(self.sequences.counts[order]))}  # one epoch at a time
        return self._orders[epoch]

    def _shard_permutation(self, epoch: int, shard: int) -> np.ndarray:
        if (epoch, shard) not in self._permutations:
            if len(self._permutations) >= 4:  # a batch spans at most a few shards: keep memory bounded
                self._permutations.clear()
            count = int(self.sequences.counts[shard])
            self._permutations[epoch, shard] = np.random.default_rng([self.seed, epoch, shard]).permutation(count)
        return self._permutations[epoch, shard]

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, sequence within shard) of the ``index``-th sequence of the endless stream."""
        epoch, i = divmod(index, self.sequences.total)
        order, cumulative = self._epoch_order(epoch)
        slot = int(np.searchsorted(cumulative, i, side="right"))
        shard = int(order[slot])
        k = i - (int(cumulative[slot - 1]) if slot else 0)
        if self.shuffle:
            k = int(self._shard_permutation(epoch, shard)[k])
        return shard, k

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets [B, T] (int64) of this rank at ``(step, micro_step)``: a pure function."""
        if not 0 <= micro_step < self.grad_accum:
            raise ValueError(f"micro_step {micro_step} outside 0..{self.grad_accum - 1}")
        first = step * self.sequences_per_step + (micro_step * self.world_size + self.rank) * self.batch_size
        with self._lock:
            windows = np.stack([self.sequences.window(*self.locate(first + b)) for b in range(self.batch_size)])
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def _prepared(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(step, micro_step)
        if self.pin_memory:
            return x.contiguous().pin_memory(), y.contiguous().pin_memory()
        return x, y

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at the current position, then advance by one micro-step. The batch after it is prepared in
        a background thread meanwhile, so the device never waits for the loader. The position, and so the state
        a checkpoint saves, counts the batches handed out: a prefetched batch is only ever a cache."""
        position = (self.step, self.micro_step)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == position:
            x, y = pending[1].result()
        else:
            if pending is not None:
                pending[1].result()  # a stale prefetch (the position was reloaded): let it finish, discard it
            x, y = self._prepared(*position)
        self.micro_step += 1
        if self.micro_step == self.grad_accum:
            self.step, self.micro_step = self.step + 1, 0
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpt2forge-loader")
        nxt = (self.step, self.micro_step)
        self._pending = (nxt, self._prefetcher.submit(self._prepared, *nxt))
        return x, y

    def close(self) -> None:
        """Stop the prefetch thread (a loader that is not closed stops it at interpreter exit)."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
            self._prefetcher, self._pending = None, None

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "micro_step": self.micro_step,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "sequences_per_step": self.sequences_per_step,
            "world_size": self.world_size,  # a record only: the global batch, not its split, fixes the data
            "data_fingerprint": self.sequences.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position, refusing a state recorded for other data, seed or global batch. The world size,
        micro-batch and accumulation may differ (elastic resume): step s reads the same global batch on any."""
        mine = self.state_dict()
        problems = [
            f"{key}: checkpoint {state.get(key)!r}, now {mine[key]!r}"
            for key in ("seed", "shuffle", "seq_len", "sequences_per_step", "data_fingerprint")
            if state.get(key) != mine[key]
        ]
        if problems:
            raise UserError(
                "the checkpoint's data position does not fit this run (" + "; ".join(problems) + "). Resume with the "
                "same data directory, seed, sequence length and total batch (train.total_batch_tokens; the number "
                "of processes may change), or start a new run"
            )
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])  # checkpoints: micro_step 0


def val_batches(
    data_dir: str | os.PathLike,
    batch_size: int,
    seq_len: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_tokens: int | None = None,
    vocab_size: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the validation set, as [B, T] batches.

    The set is the first ``max_tokens // seq_len`` sequences of the val split (all of them for None or 0): a
    function of ``max_tokens`` and ``seq_len`` alone, so 1 GPU and 8 score the same tokens, whatever the batch
    size. Global batch ``j`` goes to rank ``j % world_size``. Every batch has the full [B, T] shape (a compiled
    model never recompiles): the last one is filled up with rows whose targets are all ``IGNORE_INDEX``, and a
    rank short of a batch gets one that is ignored entirely, so every rank runs the same number of forward passes
    (under FSDP each is a collective: a rank with one batch more would wait forever). The directory is checked as
    ``TokenLoader`` checks it (and against ``vocab_size`` when given) when this is called."""
    info = check_data_dir(data_dir)
    sequences = ShardSequences(info.paths("val"), seq_len)
    if vocab_size is not None:
        info.check_vocab("val", vocab_size)
    n_sequences = val_sequences(max_tokens, seq_len, sequences.total)
    if n_sequences == 0:
        raise UserError(f"a val token budget of {max_tokens} is less than one sequence of {seq_len} tokens; raise it")
    n_global = -(-n_sequences // batch_size)
    return ValBatches(sequences, batch_size, n_sequences, range(rank, -(-n_global // world_size) * world_size,
                                                                world_size))


def val_sequences(max_tokens: int | None, seq_len: int, available: int) -> int:
    """How many val sequences a token budget scores (``val_batches``' set): for baselines on the same tokens."""
    return min(available, max_tokens // seq_len) if max_tokens else available


class ValBatches:
    """One rank's validation batches (see ``val_batches``), with a length for progress bars."""

    def __init__(self, sequences: ShardSequences, batch_size: int, n_sequences: int, batches: range) -> None:
        self.sequences, self.batch_size, self.n_sequences, self.batches = sequences, batch_size, n_sequences, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        counts = self.sequences.counts
        flat = [(s, k) for s, count in enumerate(counts) for k in range(int(count))][: self.n_sequences]
        B, T = self.batch_size, self.sequences.seq_len
        for j in self.batches:
            rows = flat[j * B : (j + 1) * B]
            windows = np.zeros((B, T + 1), dtype=np.int64)
            if rows:
                windows[: len(rows)] = np.stack([self.sequences.window(*row) for row in rows])
            windows = torch.from_numpy(windows)
            x, y = windows[:, :-1], windows[:, 1:].clone()
            y[len(rows):] = IGNORE_INDEX  # padding rows: scored by nobody
            yield x, y
