"""HellaSwag (validation split, 10,042 rows), scored completion-style as build-nanogpt does.

Each example is a context and four endings. The model reads ``context + " " + ending`` (the raw ``ctx`` field,
no other preprocessing) and we take its log-likelihood of the ending tokens: ``acc`` picks the ending with the
highest sum, ``acc_norm`` the highest mean per ending token. Published scores with this method, our regression
targets:

- OpenAI GPT-2 124M: acc_norm 0.2955 (build-nanogpt ``hellaswag.py``)
- OpenAI GPT-2 XL 1558M: acc_norm 0.4893 (build-nanogpt ``hellaswag.py``)
- GPT-3 124M (paper, few-shot setup differs): 0.337 (build-nanogpt ``play.ipynb``)

lm-evaluation-harness scores it differently (README, "Downstream tasks"). Scoring is the shared engine's
(``scoring.py``: batching to one shape, context truncation, rank split); this module reads the file. Malformed
rows are skipped and reported, so one bad line never ends a long evaluation. The same rows are the ``hellaswag``
task of the downstream suite (``tasks.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from .scoring import Example, Skipped, distributed_default, fit_to_context, padded_length, score_share, sum_over_ranks

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
N_ENDINGS = 4
SKIPPED_SHOWN = 10  # skipped rows listed by line number in results; the count covers all of them


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "gpt2forge" / "hellaswag"


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


def row_choices(row: dict) -> tuple[list[tuple[str, str]], int]:
    """(choices as (context, continuation) texts, label) of a row; ValueError saying what is wrong with it."""
    missing = [k for k in ("ctx", "endings", "label") if k not in row]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    ctx, endings, label = row["ctx"], row["endings"], row["label"]
    if not isinstance(ctx, str) or not ctx.strip():
        raise ValueError("ctx is not a non-empty string")
    if not isinstance(endings, list) or len(endings) != N_ENDINGS:
        raise ValueError(f"endings is not a list of {N_ENDINGS}")
    if not all(isinstance(e, str) and e.strip() for e in endings):
        raise ValueError("an ending is not a non-empty string")
    if isinstance(label, str) and label.strip().isdigit():  # the hub's copy stores the label as text
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        raise ValueError(f"label {row['label']!r} is not an integer in 0-{N_ENDINGS - 1}")
    return [(ctx, " " + e) for e in endings], label


def tokenize_choices(choices: list[tuple[str, str]], label: int, line: int, tokenizer) -> Example:
    """An engine ``Example`` of texts: contexts and continuations tokenized apart (an empty context reads
    ``<|endoftext|>``), per-character lengths from the continuation without its separating space."""
    return Example(
        line,
        tuple((tokenizer.encode(ctx) or [tokenizer.eot], tokenizer.encode(cont)) for ctx, cont in choices),
        tuple(len(cont.lstrip(" ")) for _, cont in choices),
        label,
    )


def _parse(line: str, number: int, tokenizer) -> Example | Skipped:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return Skipped(number, f"not valid JSON ({e.msg})")
    if not isinstance(row, dict):
        return Skipped(number, "not a JSON object")
    try:
        choices, label = row_choices(row)
    except ValueError as e:
        return Skipped(number, str(e))
    return tokenize_choices(choices, label, number, tokenizer)


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

    ``model(idx)[0]`` must be the logits. ``batch_size`` is sequences (endings) per forward pass.
    ``block_size`` defaults to ``model.config.block_size``. Rank/world size default to torch.distributed's;
    each rank scores every ``world_size``-th example and the counts are summed over ranks.
    """
    rank, world_size = distributed_default(rank, world_size)
    block_size = block_size or model.config.block_size
    examples, too_long, truncated = fit_to_context(data.examples, block_size)
    skipped = sorted(data.skipped + too_long, key=lambda s: s.line)
    if not examples:
        raise UserError(f"no HellaSwag example of {data.path} fits the model's context of {block_size} tokens")
    seq_len = padded_length(examples, block_size)  # from all examples, so every rank uses the same shape
    mine, scores = score_share(model, examples, device=device, batch_size=batch_size, seq_len=seq_len, rank=rank,
                               world_size=world_size, autocast_dtype=autocast_dtype, progress=progress and rank == 0,
                               desc="hellaswag")
    labels = [ex.label for ex in mine]
    counts = [len(mine), sum(p == y for p, y in zip(scores.predictions().tolist(), labels)),
              sum(p == y for p, y in zip(scores.predictions("token").tolist(), labels))]
    n, correct, correct_norm = (int(c) for c in sum_over_ranks(counts, device, world_size))
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
