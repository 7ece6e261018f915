"""The one scoring engine of every downstream task: (context, continuation) token pairs in, per-choice
log-likelihoods out, batched, padded to one shape, and split over ranks.

An example is a list of choices, each a context and a continuation; the model reads ``context + continuation``
and we sum the log-probabilities of the continuation tokens. What a task does with them is its own rule: pick
the choice with the highest sum (``acc``), the highest mean per token (``acc_norm``, build-nanogpt's and CORE's
normalisation) or per character (``acc_char``, lm-evaluation-harness's ``acc_norm``), or ask whether the single
continuation is the model's greedy choice at every token (LAMBADA). HellaSwag's choices share a context; a
Winogrande choice is its own context with a shared continuation: both are the same kind of example here.

Batching: every forward pass is ``batch_size`` rows (one choice each; the last batch filled with padding rows)
by one length per call (the longest row rounded up to a multiple of 64, at most the context), so a
``torch.compile``'d model compiles once per length, not once per batch. A context too long for the model loses
tokens from the left; a continuation that alone leaves no room for one context token is skipped with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .. import dist
from ..device import autocast
from ..models import IGNORE_INDEX
from ..tokenizer import EOT_TOKEN

LENGTH_MULTIPLE = 64  # padded length granularity: few distinct shapes, tensor-core friendly
NORMS = ("none", "token", "char")  # what a choice's log-likelihood is divided by: 1, its tokens, its characters


@dataclass(frozen=True)
class Example:
    """One scoreable item: ``choices`` are (context tokens, continuation tokens) pairs, ``chars`` the characters
    of each continuation (per-character normalisation), ``label`` the right choice (0 for a completion)."""

    line: int  # 1-based row number in its source
    choices: tuple[tuple[list[int], list[int]], ...]
    chars: tuple[int, ...]
    label: int


@dataclass(frozen=True)
class Skipped:
    line: int
    reason: str


def fit_to_context(examples: Sequence[Example], block_size: int) -> tuple[list[Example], list[Skipped], int]:
    """Examples cut to fit the model: (kept, skipped, number truncated).

    The model reads ``context + continuation`` minus its last token (only ever a target), so at most
    ``block_size + 1`` tokens fit. Contexts lose tokens from the left, all of an example's by the same rule (a
    shared context stays shared); an example with a continuation that leaves no room for one context token is
    skipped.
    """
    kept, skipped, truncated = [], [], 0
    for ex in examples:
        longest = max(len(cont) for _, cont in ex.choices)
        room = block_size + 1 - longest  # context tokens that fit: the same cut for every choice
        if room < 1:
            skipped.append(Skipped(ex.line, f"a continuation of {longest} tokens does not fit the context of "
                                            f"{block_size}"))
            continue
        fitted = tuple((ctx[-room:], cont) for ctx, cont in ex.choices)
        if any(len(a) != len(b) for (a, _), (b, _) in zip(fitted, ex.choices)):
            ex = replace(ex, choices=fitted)
            truncated += 1
        kept.append(ex)
    return kept, skipped, truncated


def padded_length(examples: Sequence[Example], block_size: int | None = None) -> int:
    """One input length for a set of examples: its longest row rounded up to a multiple of 64, capped at the
    context."""
    longest = max(len(ctx) + len(cont) - 1 for ex in examples for ctx, cont in ex.choices)
    length = math.ceil(longest / LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    return length if block_size is None else min(block_size, length)


@dataclass
class Scores:
    """Per-choice results, flat over the examples' choices in order: the continuation's summed log-probability,
    its tokens and characters, and whether each of its tokens was the model's argmax. ``counts``: choices per
    example."""

    logprob: torch.Tensor  # [rows] float32
    n_tokens: torch.Tensor  # [rows] int64
    n_chars: torch.Tensor  # [rows] int64
    greedy: torch.Tensor  # [rows] bool
    counts: list[int]

    def per_example(self, values: torch.Tensor) -> list[torch.Tensor]:
        return list(values.split(self.counts))

    def normalised(self, norm: str) -> torch.Tensor:
        """The log-likelihoods a prediction compares: summed (none), per token, or per character."""
        if norm == "token":
            return self.logprob / self.n_tokens
        if norm == "char":
            return self.logprob / self.n_chars.clamp(min=1)
        return self.logprob

    def predictions(self, norm: str = "none") -> torch.Tensor:
        """[examples]: the index of the most likely choice of each example under ``norm``."""
        return torch.tensor([int(v.argmax()) for v in self.per_example(self.normalised(norm))], dtype=torch.long)


def _rows(examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
    return [choice for ex in examples for choice in ex.choices]


def _batches(rows: Sequence[tuple[list[int], list[int]]], batch_size: int, seq_len: int, n_batches: int,
             pad: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(inputs, targets, real rows): [batch_size, seq_len] each; targets are ignored off the continuations."""
    for b in range(n_batches):
        chunk = rows[b * batch_size : (b + 1) * batch_size]
        idx = torch.full((batch_size, seq_len), pad, dtype=torch.long)
        tgt = torch.full_like(idx, IGNORE_INDEX)
        for i, (ctx, cont) in enumerate(chunk):
            tokens = ctx + cont
            idx[i, : len(tokens) - 1] = torch.tensor(tokens[:-1])
            tgt[i, len(ctx) - 1 : len(tokens) - 1] = torch.tensor(cont)
        yield idx, tgt, len(chunk)


def batches_needed(examples: Sequence[Example], batch_size: int) -> int:
    return math.ceil(sum(len(ex.choices) for ex in examples) / batch_size)


@torch.no_grad()
def score_examples(
    model,
    examples: Sequence[Example],
    *,
    device: str | torch.device,
    batch_size: int = 32,
    seq_len: int | None = None,
    n_batches: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> Scores:
    """Scores of ``examples`` (already fitted to the context), ``batch_size`` choices per forward pass.

    ``model(idx)[0]`` must be the logits. ``seq_len`` defaults to ``padded_length`` of the examples;
    ``n_batches`` (≥ what the examples need) adds padding-only batches so every rank of a distributed
    evaluation runs the same number of forward passes.
    """
    from ..progress import progress_bar

    device = torch.device(device)
    rows = _rows(examples)
    seq_len = seq_len or padded_length(examples)
    n_batches = max(n_batches or 0, batches_needed(examples, batch_size))
    logprobs, counts, greedy = [], [], []
    batches = _batches(rows, batch_size, seq_len, n_batches, pad=EOT_TOKEN)
    for idx, tgt, n in progress_bar(batches, total=n_batches, desc=desc, unit="batch", enabled=progress):
        idx, tgt = idx.to(device, non_blocking=True), tgt.to(device, non_blocking=True)
        with autocast(device, autocast_dtype):
            logits = model(idx)[0]
        mask = tgt != IGNORE_INDEX
        scored = logits[mask].float()  # [continuation tokens, V]: only these positions are ever normalised
        token_logprob = -F.cross_entropy(scored, tgt[mask], reduction="none")
        missed = (scored.argmax(dim=-1) != tgt[mask]).float()
        row = mask.nonzero()[:, 0]
        zeros = torch.zeros(idx.size(0), device=device, dtype=torch.float32)
        logprobs.append(zeros.index_add(0, row, token_logprob)[:n].cpu())
        greedy.append((zeros.index_add(0, row, missed) == 0)[:n].cpu())
        counts.append(mask.sum(dim=1)[:n].cpu())
    chars = torch.tensor([c for ex in examples for c in ex.chars], dtype=torch.long)
    choices = [len(ex.choices) for ex in examples]
    return Scores(torch.cat(logprobs), torch.cat(counts), chars, torch.cat(greedy), choices)


def distributed_default(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank``/``world_size``, each defaulting to the launch's (``dist``: 0 and 1 for one process)."""
    return (dist.rank() if rank is None else rank, dist.world_size() if world_size is None else world_size)


def score_share(model, examples: Sequence[Example], *, device, batch_size: int, seq_len: int, rank: int,
                world_size: int, autocast_dtype=None, progress: bool = False, desc: str = "scoring"
                ) -> tuple[list[Example], Scores]:
    """This rank's examples (every ``world_size``-th) and their scores; every rank runs the same number of
    forward passes (the most any rank needs), in train or eval mode as the caller left the model."""
    n_batches = max(batches_needed(examples[r::world_size], batch_size) for r in range(world_size))
    mine = list(examples[rank::world_size])
    was_training = model.training
    model.eval()
    try:
        scores = score_examples(model, mine, device=device, batch_size=batch_size, seq_len=seq_len,
                                n_batches=n_batches, autocast_dtype=autocast_dtype, progress=progress, desc=desc)
    finally:
        model.train(was_training)
    return mine, scores


def sum_over_ranks(values: list[float], device, world_size: int) -> list[float]:
    """``values`` summed over ranks (float64: counts stay exact)."""
    if world_size == 1:
        return values
    return dist.all_reduce(torch.tensor(values, dtype=torch.float64, device=device)).cpu().tolist()
