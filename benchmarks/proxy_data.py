"""The time-to-quality proxy's data: English prose that ships with Python, in a small lossless GPT-2-derived vocabulary.

**Text.** The quickstart's corpus is mostly Python source; the proxy trains on English instead, and the only English
every machine has offline is Python's own: the docstrings and comments of the standard library's modules
(``prose``: technical English, ~2M GPT-2 tokens; code is left out). Two more validation sets, never trained on:
``topics``, the reference-manual pages behind ``help()`` (``pydoc_data.topics``: English prose of another genre),
and, given ``heldout``, HellaSwag's contexts with their gold endings (everyday English; evaluation data, only ever
scored). The documents are ordered by a hash of their names; the first ``val_tokens`` of ``prose`` are its val split.

**Vocabulary.** GPT-2's 50,257 rows would be 94% of a tiny model's parameters. The proxy keeps GPT-2's tokens but
only ``size`` of them: GPT-2's 256 single-byte tokens, ``<|endoftext|>``, and the most frequent multi-byte tokens
of the training split; every other GPT-2 token is spelt with its bytes' tokens. That is still a GPT-2 token
sequence of the same text (decoding gives the same bytes), with ids remapped to ``0..size-1``; so it is lossless,
and bits per byte are comparable with any vocabulary. ``vocab.json`` maps each proxy id to its GPT-2 id and byte
count (``<|endoftext|>``: 0 bytes).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import shutil
import sysconfig
import tokenize
from pathlib import Path

import numpy as np

from gpt2forge.data.shards import write_shard
from gpt2forge.data.sources import EMBEDDED_SKIP_DIRS
from gpt2forge.files import atomic_write_json
from gpt2forge.tokenizer import EOT_TOKEN, get_tokenizer

FORMAT = 1  # bump when what build() writes changes, so stale directories are rebuilt
SETS = ("prose", "topics", "hellaswag")  # every set build() can write, in the order they are scored


def prose_of(source: str) -> str:
    """The docstrings and comments of a Python module, in source order (paragraphs separated by blank lines)."""
    pieces = []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                line = node.body[0].lineno if node.body else 0
                pieces.append((line, doc))
    comment, start = [], 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT and not tok.string.startswith("#!"):
                if not comment:
                    start = tok.start[0]
                comment.append(tok.string.lstrip("#").strip())
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT) and comment:
                pieces.append((start, " ".join(c for c in comment if c)))
                comment = []
    except (tokenize.TokenError, SyntaxError):
        pass
    return "\n\n".join(text for _, text in sorted(pieces) if len(text.split()) >= 3)  # drop "noqa"-like stubs


def prose_documents() -> list[str]:
    """The standard library's prose (``prose_of`` each module), ordered by a hash of the module's path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    named = {}
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EMBEDDED_SKIP_DIRS and not d.startswith("config-")]
        for name in names:
            if name.endswith(".py"):
                path = Path(directory, name)
                text = prose_of(path.read_text(encoding="utf-8", errors="replace"))
                if text:
                    named[path.relative_to(root).as_posix()] = text
    return [named[k] for k in sorted(named, key=lambda k: hashlib.sha256(k.encode()).digest())]


def topics_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics, key=lambda k: hashlib.sha256(k.encode()).digest())]


def hellaswag_documents(jsonl: Path) -> list[str]:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    return [row["ctx"] + " " + row["endings"][int(row["label"])] for row in rows]


def gpt2_tokens(texts: list[str]) -> np.ndarray:
    """GPT-2 tokens of the documents, each followed by ``<|endoftext|>`` (GPT-2's convention, as ``prepare``)."""
    tokenizer = get_tokenizer()
    out = []
    for ids in tokenizer.encoding.encode_ordinary_batch(texts):
        out += ids + [EOT_TOKEN]
    return np.array(out, dtype=np.int64)


class ProxyVocab:
    """GPT-2's byte tokens, ``<|endoftext|>`` and the most frequent other tokens; the rest spelt in bytes."""

    def __init__(self, gpt2_ids: list[int]) -> None:
        tokenizer = get_tokenizer()
        self.gpt2_ids = np.array(gpt2_ids, dtype=np.int64)
        self.byte_lengths = np.array([0 if t == EOT_TOKEN else len(tokenizer.encoding.decode_single_token_bytes(t))
                                      for t in gpt2_ids], dtype=np.int64)
        # every GPT-2 token as a run of proxy ids: itself where kept, else its bytes' tokens
        byte_id = {tokenizer.encoding.decode_single_token_bytes(t)[0]: i for i, t in enumerate(gpt2_ids[:256])}
        kept = {t: i for i, t in enumerate(gpt2_ids)}
        spelt = [[kept[t]] if t in kept else [byte_id[b] for b in tokenizer.encoding.decode_single_token_bytes(t)]
                 for t in range(EOT_TOKEN + 1)]
        self.lengths = np.array([len(s) for s in spelt], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.flat = np.array([i for s in spelt for i in s], dtype=np.int64)

    @classmethod
    def build(cls, train_tokens: np.ndarray, size: int) -> ProxyVocab:
        tokenizer = get_tokenizer()
        singles = sorted((t for t in range(EOT_TOKEN) if len(tokenizer.encoding.decode_single_token_bytes(t)) == 1),
                         key=lambda t: tokenizer.encoding.decode_single_token_bytes(t))
        assert len(singles) == 256, "GPT-2 has one token per byte"
        counts = np.bincount(train_tokens, minlength=EOT_TOKEN + 1)
        counts[singles + [EOT_TOKEN]] = -1  # already in
        order = np.argsort(-counts, kind="stable")  # most frequent first, ties by id
        extra = [int(t) for t in order[: size - 257] if counts[t] > 0]
        return cls(singles + [EOT_TOKEN] + extra)

    @property
    def size(self) -> int:
        return len(self.gpt2_ids)

    def encode(self, gpt2: np.ndarray) -> np.ndarray:
        """Proxy ids of a GPT-2 token sequence (lossless: ``decode(encode(x))`` has ``x``'s bytes)."""
        n = self.lengths[gpt2]
        starts = np.repeat(self.offsets[gpt2], n)
        within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        return self.flat[starts + within]

    def decode_bytes(self, ids: np.ndarray) -> bytes:
        return get_tokenizer().decode_bytes([int(t) for t in self.gpt2_ids[ids] if t != EOT_TOKEN])


def build(out: Path, size: int, val_tokens: int, heldout: Path | None = None, *, documents=None) -> dict:
    """Write the proxy's shard directories under ``out`` (``prose``: train + val; ``topics`` and ``hellaswag``: val
    only) and ``vocab.json``; reuse them when ``vocab.json`` says they were built with the same settings. A set
    an earlier build wrote and this one does not (``hellaswag`` without ``heldout``) is removed, not left to be
    scored in another vocabulary. ``documents``: ``{"prose": [...], "topics": [...]}`` to use instead of Python's
    (the tests' small corpus)."""
    out = Path(out)
    settings = {"format": FORMAT, "size": size, "val_tokens": val_tokens, "heldout": str(heldout) if heldout else None,
                "documents": "given" if documents else "python"}
    meta_path = out / "vocab.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["settings"] == settings:
            return meta
    documents = documents or {"prose": prose_documents(), "topics": topics_documents()}
    prose = gpt2_tokens(documents["prose"])
    if val_tokens >= len(prose) // 2:
        raise ValueError(f"val_tokens {val_tokens:,} leaves too little of the {len(prose):,}-token corpus to train on")
    vocab = ProxyVocab.build(prose[val_tokens:], size)  # counted on the training split only
    sets = {"prose": (prose[:val_tokens], prose[val_tokens:]), "topics": (gpt2_tokens(documents["topics"]), None)}
    if heldout is not None:
        sets["hellaswag"] = (gpt2_tokens(hellaswag_documents(heldout)), None)
    for stale in SETS:  # a set the last build wrote and this one does not: never score it
        if stale not in sets and (out / stale).is_dir():
            shutil.rmtree(out / stale)
    stats = {}
    for name, (val, train) in sets.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        for split, tokens in (("val", val), ("train", train)):
            if tokens is None:
                continue
            ids = vocab.encode(tokens)
            write_shard(out / name / f"{name}_{split}_000000.bin", ids.astype(np.uint16))
            nbytes = int(vocab.byte_lengths[ids].sum())
            stats[f"{name}_{split}"] = {"gpt2_tokens": len(tokens), "proxy_tokens": len(ids), "bytes": nbytes,
                                        "bytes_per_proxy_token": nbytes / len(ids)}
    meta = {"settings": settings, "size": vocab.size, "gpt2_ids": vocab.gpt2_ids.tolist(),
            "byte_lengths": vocab.byte_lengths.tolist(), "stats": stats}
    atomic_write_json(meta_path, meta)
    return meta
