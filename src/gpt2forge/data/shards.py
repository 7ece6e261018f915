"""The token shard file: llm.c / modded-nanogpt's ``.bin`` format, written atomically and checked on read.

Layout: a header of 256 little-endian int32 (``[0]`` magic 20240520, ``[1]`` version 1, ``[2]`` token count,
the rest zero), then the tokens as little-endian uint16. Shards therefore interoperate with llm.c's tools and
with the pre-tokenized FineWeb shards those projects publish.

A prepared directory holds shards named like llm.c's, ``<prefix>_<split>_<index:06d>.bin``
(``fineweb-edu_val_000000.bin``, ``fineweb-edu_train_000001.bin``, …): readers select a split by the
``_val_`` / ``_train_`` in the name. What lies beside them: ``manifest`` (how they were made, each shard's
token count, sha256 and largest token id); how training opens such a directory: ``datadir``.
"""

from __future__ import annotations

import hashlib
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
SHARD_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>val|train)_(?P<index>\d{6})\.bin$")
SPLITS = ("train", "val")


class ShardError(UserError):
    """A shard file that is missing, truncated or not in the expected format."""


def shard_name(prefix: str, split: str, index: int) -> str:
    """The llm.c-style file name of shard ``index`` (indices run on across splits: val 0, train 1, 2, …)."""
    return f"{prefix}_{split}_{index:06d}.bin"


def shard_files(out: Path, prefix: str | None = None) -> list[Path]:
    """The shard files in ``out`` named as ``prepare`` names them (of one prefix, if given), in name order."""
    found = ((p, SHARD_NAME.match(p.name)) for p in out.iterdir())
    return sorted(p for p, m in found if m and prefix in (None, m["prefix"]))


def split_globs(directory: Path) -> list[Path]:
    """Every file a reader would take for a shard: ``*_val_*.bin`` and ``*_train_*.bin``."""
    return sorted({*directory.glob("*_val_*.bin"), *directory.glob("*_train_*.bin")})


def shard_bytes(tokens: int) -> int:
    """The size of a shard file holding ``tokens`` tokens."""
    return HEADER_BYTES + tokens * TOKEN_DTYPE.itemsize


def shard_sha256(tokens: np.ndarray) -> str:
    """The sha256 of the file ``write_shard`` makes of these (uint16) tokens, without writing it."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    digest = hashlib.sha256(header.tobytes())
    digest.update(memoryview(np.ascontiguousarray(tokens.astype(TOKEN_DTYPE, copy=False))).cast("B"))
    return digest.hexdigest()


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> str:
    """Write ``tokens`` as a shard via a temporary file, fsync and rename; return the file's sha256.

    On any failure (a full disk, say) the temporary file is removed: no half-written shard is left behind, and
    ``path`` keeps whatever it held before."""
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
    body = np.ascontiguousarray(tokens.astype(TOKEN_DTYPE, copy=False))
    sha256 = shard_sha256(body)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(body.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return sha256


def read_header(path: str | os.PathLike) -> int:
    """The token count of a shard, after checking magic, version and that the file size matches it."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist")
    try:
        size = path.stat().st_size
        if size < HEADER_BYTES:
            raise ShardError(f"shard {path} is {size} bytes, shorter than the {HEADER_BYTES}-byte header: truncated?")
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e.strerror or e}") from None
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
            "truncated or corrupted"
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


# ---------------------------------------------------------------- the largest token id of a shard

_max_tokens: dict[tuple[str, int, int], int | None] = {}  # (path, size, mtime_ns) -> largest id, per process


def _stat_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def scan_shard(path: str | os.PathLike, chunk: int = 1 << 24) -> tuple[str, int | None]:
    """(sha256 of the file, largest token id or None when empty) of a shard with a checked header, in one read."""
    path = Path(path)
    digest, top = hashlib.sha256(), None
    with open(path, "rb") as f:
        digest.update(f.read(HEADER_BYTES))
        while block := f.read(chunk - chunk % 2):
            digest.update(block)
            body = np.frombuffer(block, dtype=TOKEN_DTYPE, count=len(block) // 2)
            if body.size:
                top = max(top if top is not None else 0, int(body.max()))
    _max_tokens[_stat_key(path)] = top
    return digest.hexdigest(), top


def shard_max_token(path: str | os.PathLike) -> int | None:
    """The largest token id in a shard (None when it is empty): ``np.max`` over the memory-mapped tokens,
    about 50 ms per 100M-token shard once it is in the page cache, remembered per process."""
    path = Path(path)
    key = _stat_key(path)
    if key not in _max_tokens:
        tokens = open_shard(path)
        _max_tokens[key] = int(tokens.max()) if tokens.size else None
    return _max_tokens[key]
