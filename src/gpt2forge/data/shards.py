"""The token shard file: llm.c / modded-nanogpt's ``.bin`` format, written atomically and checked on read.

Layout: a header of 256 little-endian int32 (``[0]`` magic 20240520, ``[1]`` version 1, ``[2]`` token count,
the rest zero), then the tokens as little-endian uint16. Shards therefore interoperate with llm.c's tools and
with the pre-tokenized FineWeb shards those projects publish.

A prepared directory holds shards named like llm.c's, ``<prefix>_<split>_<index:06d>.bin``
(``fineweb-edu_val_000000.bin``, ``fineweb-edu_train_000001.bin``, …): readers select a split by the
``_val_`` / ``_train_`` in the name. Beside them, ``manifest.json`` records how they were made and each shard's
token count and sha256 (see ``gpt2forge.data.prepare``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import fsync_dir

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MANIFEST_NAME = "manifest.json"
SHARD_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>val|train)_(?P<index>\d{6})\.bin$")


class ShardError(UserError):
    """A shard file that is missing, truncated or not in the expected format."""


def shard_name(prefix: str, split: str, index: int) -> str:
    """The llm.c-style file name of shard ``index`` (indices run on across splits: val 0, train 1, 2, …)."""
    return f"{prefix}_{split}_{index:06d}.bin"


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The ``manifest.json`` of a prepared directory, or None where there is none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path} is not valid JSON ({e}): corrupted? `prepare --overwrite` rebuilds it") from None


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """Write ``tokens`` as a shard via a temporary file, fsync and rename; return the file's sha256."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be one-dimensional, got shape {tokens.shape}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > np.iinfo(TOKEN_DTYPE).max):
        raise ShardError(
            f"{path}: token ids range over [{int(tokens.min())}, {int(tokens.max())}], "
            "which does not fit uint16: shards hold GPT-2-sized vocabularies (< 65,536) only"
        )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    body = tokens.astype(TOKEN_DTYPE, copy=False)
    digest = hashlib.sha256(header.tobytes())
    digest.update(memoryview(np.ascontiguousarray(body)).cast("B"))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(body).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return digest.hexdigest()


def read_header(path: str | os.PathLike) -> int:
    """The token count of a shard, after checking magic, version and that the file size matches it."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte header: truncated?")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = (int(v) for v in header[:3])
    if magic != MAGIC:
        raise ShardError(f"shard {path} has magic {magic}, expected {MAGIC}: not an llm.c-format token shard")
    if version != VERSION:
        raise ShardError(
            f"shard {path} has version {version}, expected {VERSION} (uint16 GPT-2 tokens; "
            "version 2 is llm.c's uint32 Llama-3 format)"
        )
    expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if size != expected:
        raise ShardError(
            f"shard {path} is {size} bytes but its header promises {count:,} tokens ({expected} bytes): "
            "truncated or corrupted; re-run `gpt2forge prepare` to rebuild it"
        )
    return count


def open_shard(path: str | os.PathLike) -> np.memmap:
    """The tokens of a checked shard, memory-mapped read-only (nothing is loaded until it is indexed)."""
    count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)  # numpy cannot map an empty region
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
