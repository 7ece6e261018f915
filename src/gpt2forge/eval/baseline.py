"""The corpus's unigram baseline: the loss of predicting every token by its frequency in the train split.

A model that learned anything about context beats it clearly, so it is the yardstick for a run on data that
has no published reference numbers. The gap is honest only when both losses score the same tokens: the
baseline is measured on exactly the validation targets the run's validation loss scores.

**Which tokens.** With sequence length ``T``, the val shards are read in name order; a shard of ``n`` tokens
holds ``(n - 1) // T`` sequences, sequence ``k`` being the window ``val[kT : kT+T+1]`` whose targets are
``val[kT+1 : kT+T+1]``. The validation loss scores the targets of the first ``val_tokens // T`` of these
sequences (``val_tokens = 0``: all of them), whatever the batch size and world size.

**Frequencies.** Train-split token counts, add-one smoothed (an unseen token costs ``log(total + V)``, not
infinity). A unigram distribution settles long before 10B tokens, so at most ``train_tokens_cap`` tokens
(the first ones, shards in name order) are counted; the result says how many were.
"""

from __future__ import annotations

import os

import numpy as np

from ..data.loader import find_shards
from ..data.shards import open_shard
from ..errors import UserError

TRAIN_TOKENS_CAP = 200_000_000  # ~1 s per 100M tokens from a warm page cache
CHUNK = 1 << 24  # bincount widens uint16 to int64: count in pieces to bound memory (128 MiB per piece)


def _count(tokens: np.ndarray, counts: np.ndarray) -> None:
    """Add the token counts of ``tokens`` to ``counts`` (in pieces), refusing ids outside the vocabulary."""
    vocab_size = len(counts)
    for start in range(0, len(tokens), CHUNK):
        piece = np.bincount(tokens[start : start + CHUNK], minlength=vocab_size)
        if len(piece) > vocab_size:
            raise UserError(f"token id {len(piece) - 1} is outside the vocabulary of {vocab_size} tokens")
        counts += piece


def val_targets(data_dir: str | os.PathLike, seq_len: int, val_tokens: int) -> list[np.ndarray]:
    """The validation targets the run's val loss scores, one array (a memory-mapped view) per val shard used."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if val_tokens < 0:
        raise ValueError(f"val_tokens must be ≥ 0 (0 = the whole val split), got {val_tokens}")
    remaining = val_tokens // seq_len if val_tokens else None  # sequences still to take (None: all)
    if remaining == 0:
        raise UserError(f"val_tokens {val_tokens} is less than one sequence of {seq_len} tokens")
    pieces = []
    for path in find_shards(data_dir, "val"):
        if remaining == 0:
            break
        tokens = open_shard(path)
        sequences = (len(tokens) - 1) // seq_len if len(tokens) > seq_len else 0
        if remaining is not None:
            sequences = min(sequences, remaining)
            remaining -= sequences
        if sequences:  # the targets of windows 0..m-1 are contiguous: tokens[1 : mT + 1]
            pieces.append(tokens[1 : sequences * seq_len + 1])
    if not pieces:
        raise UserError(f"the val shards in {data_dir} hold no sequence of {seq_len}+1 tokens")
    return pieces


def unigram_loss(
    data_dir: str | os.PathLike,
    seq_len: int,
    val_tokens: int,
    vocab_size: int = 50257,
    train_tokens_cap: int | None = TRAIN_TOKENS_CAP,
) -> dict:
    """Cross-entropy (nats/token) of add-one-smoothed train-split token frequencies on the val targets that the
    run's validation loss scores (see the module docstring).

    Returns ``loss``; ``tokens``, the val tokens scored; ``train_tokens_counted`` and ``train_tokens_total``
    (they differ when ``train_tokens_cap`` cut the count short; None counts everything) and ``capped``."""
    counts = np.ones(vocab_size, dtype=np.int64)
    counted = total = 0
    for path in find_shards(data_dir, "train"):
        tokens = open_shard(path)
        total += len(tokens)
        take = len(tokens) if train_tokens_cap is None else max(0, min(len(tokens), train_tokens_cap - counted))
        if take:
            _count(tokens[:take], counts)
            counted += take
    log_probs = np.log(counts) - np.log(counts.sum())

    scored = np.zeros(vocab_size, dtype=np.int64)
    for targets in val_targets(data_dir, seq_len, val_tokens):
        _count(targets, scored)
    n = int(scored.sum())
    return {
        "loss": float(-(scored * log_probs).sum() / n),
        "tokens": n,
        "train_tokens_counted": counted,
        "train_tokens_total": total,
        "capped": counted < total,
    }
