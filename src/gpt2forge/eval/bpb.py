"""Bits per byte: the loss in a unit that compares across tokenizers.

Nats per token depend on how much text a token holds; bits per byte divide the same total by the text's size:
``bpb = Σ nats / (ln 2 · Σ bytes)``, where the bytes are the UTF-8 bytes the target tokens decode to. Both sums run
over exactly the targets the loss scores, summed over ranks like the nats, so 1 GPU and 8 give the same number.

``<|endoftext|>`` is a document boundary, not text: it decodes to no bytes here, but its nats stay in the sum (the
cost of predicting where a document ends is charged to the text). nanochat drops such tokens from both sums;
the two differ by the boundaries' share of the nats, small where documents are long.
"""

from __future__ import annotations

import functools
import math

import torch

from ..tokenizer import EOT_TOKEN, get_tokenizer


@functools.lru_cache(maxsize=4)
def _byte_lengths(vocab_dir: str | None) -> tuple[int, ...]:
    encoding = get_tokenizer(vocab_dir).encoding
    return tuple(0 if i == EOT_TOKEN else len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab))


def token_byte_lengths(vocab_dir: str | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """[50257] int64: how many UTF-8 bytes each GPT-2 token decodes to (``<|endoftext|>``: 0)."""
    return torch.tensor(_byte_lengths(vocab_dir), dtype=torch.int64, device=device)


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Total nats over ``n_bytes`` bytes, in bits per byte."""
    return nats / (math.log(2) * n_bytes) if n_bytes else float("nan")
