"""HellaSwag (validation split, 10,042 rows), scored completion-style as build-nanogpt does.

Each example is a context and four endings. The model reads ``context + " " + ending`` and we take its
cross-entropy over the ending tokens only: ``acc`` picks the ending with the lowest summed loss, ``acc_norm``
the lowest loss per ending token. Published scores with this method, our regression targets:

- OpenAI GPT-2 124M: acc_norm 0.2955 (build-nanogpt ``hellaswag.py``)
- OpenAI GPT-2 XL 1558M: acc_norm 0.4893 (build-nanogpt ``hellaswag.py``)
- GPT-3 124M (paper, few-shot setup differs): 0.337 (build-nanogpt ``play.ipynb``)

Batching pads every forward pass to one shape: ``batch_size`` rows (four per example, the last batch filled
with padding rows) by one length for the whole dataset (the longest example rounded up to a multiple of 64,
at most the context). A ``torch.compile``'d model therefore compiles once, not once per batch.

An example longer than the context keeps its endings whole and loses context tokens from the left (all four
endings see the same context); one whose ending alone does not fit is skipped with a reason. Malformed rows
are skipped and reported too, so one bad line never ends a long evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import dist
from ..device import autocast
from ..errors import UserError
from ..models import IGNORE_INDEX
from ..tokenizer import EOT_TOKEN

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
N_ENDINGS = 4
LENGTH_MULTIPLE = 64  # padded length granularity: few distinct shapes, tensor-core friendly
SKIPPED_SHOWN = 10  # skipped rows listed by line number in results; the count covers all of them


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "gpt2forge" / "hellaswag"


@dataclass(frozen=True)
class Example:
    """One scoreable row, tokenized: ``endings`` are the tokens of ``" " + ending``."""

    line: int  # 1-based line number in the jsonl file
    context: list[int]
    endings: list[list[int]]
    label: int


@dataclass(frozen=True)
class Skipped:
    line: int
    reason: str


@dataclass
class HellaSwagData:
    """The examples of a HellaSwag file, the rows that could not be used, and where they came from."""

    path: Path
    sha256: str
    rows: int  # non-blank lines read (after --limit)
    examples: list[Example]
    skipped: list[Skipped] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- the file


def _fetch(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Download ``url`` to ``dest`` via a temporary file and a rename, so a cut download never looks complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def locate(path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
           flag: str = "--hellaswag-file") -> Path:
    """The HellaSwag val file: ``path`` when given, else the cached download, downloading it when missing.
    ``flag``: how the calling command spells the file's option, for the messages."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"HellaSwag file {path} ({flag}) does not exist")
        return path
    cached = Path(cache_dir or default_cache_dir()) / Path(URL).name
    if cached.is_file():
        return cached
    try:
        _fetch(URL, cached)
    except Exception as e:  # offline, DNS, HTTP, disk: all end the same way for the user
        raise UserError(
            f"could not download HellaSwag from {URL} into {cached.parent} ({type(e).__name__}: {e}); "
            f"offline, pass a local copy of hellaswag_val.jsonl with {flag}=PATH"
        ) from None
    return cached


def _parse(line: str, number: int, tokenizer) -> Example | Skipped:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return Skipped(number, f"not valid JSON ({e.msg})")
    if not isinstance(row, dict):
        return Skipped(number, "not a JSON object")
    missing = [k for k in ("ctx", "endings", "label") if k not in row]
    if missing:
        return Skipped(number, f"missing field(s) {', '.join(missing)}")
    ctx, endings, label = row["ctx"], row["endings"], row["label"]
    if not isinstance(ctx, str) or not ctx.strip():
        return Skipped(number, "ctx is not a non-empty string")
    if not isinstance(endings, list) or len(endings) != N_ENDINGS:
        return Skipped(number, f"endings is not a list of {N_ENDINGS}")
    if not all(isinstance(e, str) and e.strip() for e in endings):
        return Skipped(number, "an ending is not a non-empty string")
    if isinstance(label, str) and label.strip().isdigit():  # some copies store the label as text
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        return Skipped(number, f"label {row['label']!r} is not an integer in 0-{N_ENDINGS - 1}")
    return Example(number, tokenizer.encode(ctx), [tokenizer.encode(" " + e) for e in endings], label)


def load_hellaswag(
    path: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    tokenizer=None,
    flag: str = "--hellaswag-file",
) -> HellaSwagData:
    """Read and tokenize HellaSwag (see ``locate`` for where it comes from, and ``flag``); ``limit`` keeps the
    first N rows."""
    if tokenizer is None:
        from ..tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    path = locate(path, cache_dir=cache_dir, flag=flag)
    digest = hashlib.sha256()
    examples, skipped, rows = [], [], 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            digest.update(raw)
            if limit is not None and rows >= limit:
                continue  # keep hashing: the sha256 names the whole file
            if not raw.strip():
                continue
            rows += 1
            try:
                parsed = _parse(raw.decode("utf-8"), number, tokenizer)
            except UnicodeDecodeError:
                parsed = Skipped(number, "not valid UTF-8")
            (examples if isinstance(parsed, Example) else skipped).append(parsed)
    if not examples:
        reasons = "; ".join(f"line {s.line}: {s.reason}" for s in skipped[:3])
        raise UserError(f"HellaSwag file {path} has no usable rows ({rows} read{': ' + reasons if reasons else ''})")
    return HellaSwagData(path, digest.hexdigest(), rows, examples, skipped)


# ------------------------------------------------------------------------------------------- scoring


def fit_to_context(examples: Sequence[Example], block_size: int) -> tuple[list[Example], list[Skipped], int]:
    """Examples cut to fit the model: (kept, skipped, number truncated).

    The model reads ``context + ending`` minus its last token (which is only ever a target), so at most
    ``block_size + 1`` tokens fit. Context is dropped from the left; an ending alone that leaves no room for one
    context token is skipped.
    """
    kept, skipped, truncated = [], [], 0
    for ex in examples:
        longest = max(map(len, ex.endings))
        room = block_size + 1 - longest  # context tokens that fit
        if room < 1:
            skipped.append(Skipped(ex.line, f"an ending of {longest} tokens does not fit the context of {block_size}"))
            continue
        if len(ex.context) > room:
            ex = replace(ex, context=ex.context[-room:])
            truncated += 1
        kept.append(ex)
    return kept, skipped, truncated


def padded_length(examples: Sequence[Example], block_size: int | None = None) -> int:
    """The one input length for a dataset: its longest input rounded up to a multiple of 64, capped at the context."""
    longest = max(len(ex.context) + max(map(len, ex.endings)) - 1 for ex in examples)
    length = math.ceil(longest / LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    return length if block_size is None else min(block_size, length)


@dataclass
class Scores:
    """Per-example, per-ending losses: ``sum_loss`` and ``n_tokens`` are [N, 4]."""

    sum_loss: torch.Tensor
    n_tokens: torch.Tensor

    @property
    def mean_loss(self) -> torch.Tensor:
        return self.sum_loss / self.n_tokens

    @property
    def pred(self) -> torch.Tensor:
        return self.sum_loss.argmin(dim=1)

    @property
    def pred_norm(self) -> torch.Tensor:
        return self.mean_loss.argmin(dim=1)


def _batches(
    examples: Sequence[Example], per_batch: int, seq_len: int, n_batches: int, pad: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(inputs, targets, examples in batch): [per_batch·4, seq_len] each; targets are ignored off the endings."""
    for b in range(n_batches):
        chunk = examples[b * per_batch : (b + 1) * per_batch]
        idx = torch.full((per_batch * N_ENDINGS, seq_len), pad, dtype=torch.long)
        tgt = torch.full_like(idx, IGNORE_INDEX)
        for i, ex in enumerate(chunk):
            for j, ending in enumerate(ex.endings):
                row, tokens = i * N_ENDINGS + j, ex.context + ending
                idx[row, : len(tokens) - 1] = torch.tensor(tokens[:-1])
                tgt[row, len(ex.context) - 1 : len(tokens) - 1] = torch.tensor(ending)
        yield idx, tgt, len(chunk)


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
) -> Scores:
    """Ending losses of ``examples`` (already fitted to the context), ``batch_size // 4`` examples per forward.

    ``seq_len`` defaults to ``padded_length`` of the examples; ``n_batches`` (≥ what the examples need) adds
    padding-only batches so every rank of a distributed eval runs the same number of forward passes.
    """
    from ..progress import progress_bar

    device = torch.device(device)
    per_batch = max(1, batch_size // N_ENDINGS)
    seq_len = seq_len or padded_length(examples)
    n_batches = max(n_batches or 0, math.ceil(len(examples) / per_batch))
    sums, counts = [], []
    batches = _batches(examples, per_batch, seq_len, n_batches, pad=EOT_TOKEN)
    for idx, tgt, n in progress_bar(batches, total=n_batches, desc="hellaswag", unit="batch", enabled=progress):
        idx, tgt = idx.to(device, non_blocking=True), tgt.to(device, non_blocking=True)
        with autocast(device, autocast_dtype):
            logits = model(idx)[0]
        mask = tgt != IGNORE_INDEX
        losses = F.cross_entropy(logits[mask].float(), tgt[mask], reduction="none")  # ending tokens only
        rows = mask.nonzero()[:, 0]
        row_sums = torch.zeros(idx.size(0), device=device, dtype=torch.float32).index_add_(0, rows, losses)
        sums.append(row_sums.view(-1, N_ENDINGS)[:n].cpu())
        counts.append(mask.sum(dim=1).view(-1, N_ENDINGS)[:n].cpu())
    return Scores(torch.cat(sums), torch.cat(counts))


def evaluate_hellaswag(
    model,
    data: HellaSwagData,
    *,
    device: str | torch.device,
    batch_size: int = 32,
    autocast_dtype: torch.dtype | None = None,
    block_size: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> dict:
    """acc, acc_norm and counts over ``data``; callable from the training loop with a compiled model.

    ``model(idx)[0]`` must be the logits. ``batch_size`` is sequences per forward pass (four per example).
    ``block_size`` defaults to ``model.config.block_size``. Rank/world size default to torch.distributed's;
    each rank scores every ``world_size``-th example and the counts are summed over ranks.
    """
    rank = dist.rank() if rank is None else rank
    world_size = dist.world_size() if world_size is None else world_size
    block_size = block_size or model.config.block_size
    examples, too_long, truncated = fit_to_context(data.examples, block_size)
    skipped = sorted(data.skipped + too_long, key=lambda s: s.line)
    if not examples:
        raise UserError(f"no HellaSwag example of {data.path} fits the model's context of {block_size} tokens")
    seq_len = padded_length(examples, block_size)  # from all examples, so every rank uses the same shape
    n_batches = math.ceil(math.ceil(len(examples) / world_size) / max(1, batch_size // N_ENDINGS))
    mine = examples[rank::world_size]
    was_training = model.training
    model.eval()
    try:
        scores = score_examples(
            model, mine, device=device, batch_size=batch_size, seq_len=seq_len, n_batches=n_batches,
            autocast_dtype=autocast_dtype, progress=progress and rank == 0,
        )
    finally:
        model.train(was_training)
    labels = torch.tensor([ex.label for ex in mine], dtype=torch.long)
    counts = torch.tensor(
        [len(mine), int((scores.pred == labels).sum()), int((scores.pred_norm == labels).sum())], dtype=torch.long
    )
    if world_size > 1:
        counts = dist.all_reduce(counts.to(device)).cpu()
    n, correct, correct_norm = counts.tolist()
    return {
        "acc": correct / n,
        "acc_norm": correct_norm / n,
        "n": n,
        "correct": correct,
        "correct_norm": correct_norm,
        "truncated": truncated,
        "skipped": len(skipped),
        "skipped_rows": [{"line": s.line, "reason": s.reason} for s in skipped[:SKIPPED_SHOWN]],
        "rows": data.rows,
        "file": str(data.path),
        "sha256": data.sha256,
        "seq_len": seq_len,
    }
