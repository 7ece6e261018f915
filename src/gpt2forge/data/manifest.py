"""``manifest.json``, read and written here only: how a prepared directory was made (``Settings``: everything that
decides its bytes), each shard's entry (file, split, token count, documents, largest token id, sha256, and
``end``: where the next shard starts in the source), totals, and whether preparation finished. Beside it,
``verify-failures.json``: the shards ``prepare --verify`` last found corrupted.

Manifests written before ``max_token`` existed lack it; readers then scan the shard instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import atomic_write_json
from ..tokenizer import BPE_SHA256, ENCODER_SHA256, EOT_TOKEN
from .shards import ShardError, read_header, scan_shard, shard_max_token

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gpt2forge token shards"
VERIFY_FAILURES_NAME = "verify-failures.json"  # written by `prepare --verify` when it finds corrupted shards
EOT_PLACEMENT = "after each document"
ENTRY_KEYS = ("file", "split", "tokens", "documents", "max_token", "sha256", "end")  # a shard entry, in order


@dataclass(frozen=True)
class Settings:
    """Everything that determines the bytes of the output; workers and batch sizes do not."""

    source: dict
    text_column: str
    min_score: float | None
    score_column: str | None
    max_tokens: int | None
    shard_size: int
    val_tokens: int
    prefix: str
    tokenizer: dict
    eot: str = EOT_PLACEMENT

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # as it reads back from the manifest (lists, not tuples)

    def shard_plan(self, index: int) -> tuple[str, int]:
        """(split, capacity) of shard ``index``: val shards up to ``val_tokens``, then train shards."""
        full_val, last_val = divmod(self.val_tokens, self.shard_size)
        if index < full_val:
            return "val", self.shard_size
        if index == full_val and last_val:
            return "val", last_val
        return "train", self.shard_size


def tokenizer_description() -> dict:
    """The tokenizer as the manifest records it: its vocabulary files' hashes and the EOT id."""
    return {"name": "gpt2", "encoder_json_sha256": ENCODER_SHA256, "vocab_bpe_sha256": BPE_SHA256, "eot_id": EOT_TOKEN}


def new_manifest(settings: Settings) -> dict:
    """The manifest of a directory about to be prepared: no shards yet."""
    return {"format": MANIFEST_FORMAT, "version": 1, "complete": False, "settings": settings.as_json(), "shards": []}


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The ``manifest.json`` of a prepared directory, or None where there is none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path} is not valid JSON ({e}): corrupted? `prepare --overwrite` rebuilds it") from None
    except OSError as e:
        raise ShardError(f"cannot read {path}: {e.strerror or e}") from None


def save_manifest(manifest: dict, out: Path) -> None:
    """Write ``manifest`` atomically into ``out``, with its totals recomputed from the shard entries."""
    shards = manifest["shards"]
    manifest["totals"] = {
        "tokens": sum(s["tokens"] for s in shards),
        "val_tokens": sum(s["tokens"] for s in shards if s["split"] == "val"),
        "train_tokens": sum(s["tokens"] for s in shards if s["split"] == "train"),
        "documents": sum(s["documents"] for s in shards),
        "shards": len(shards),
    }
    atomic_write_json(out / MANIFEST_NAME, manifest, indent=1)


def ordered_entry(fields: dict) -> dict:
    """A shard entry with its keys in one order, however it was assembled: the manifest of a resumed or
    repaired run is then byte-identical to that of an uninterrupted one."""
    return {**{key: fields[key] for key in ENTRY_KEYS if key in fields}, **fields}


def with_max_token(out: Path, listed: dict) -> dict:
    """An older entry (written before ``max_token`` existed) completed from its shard: a cache hit right after a
    full check, which read every byte anyway."""
    if "max_token" in listed:
        return listed
    return ordered_entry({**listed, "max_token": shard_max_token(out / listed["file"])})


def listed_shard_problem(directory: str | os.PathLike, entry: dict, *, full: bool = False) -> str | None:
    """What is wrong with a shard that a manifest lists, or None. Cheap by default (exists, header, size, token
    count); ``full`` also compares every byte's sha256 (and so learns its largest token id on the way)."""
    path = Path(directory) / entry["file"]
    if not path.exists():
        return "missing"
    try:
        count = read_header(path)
    except ShardError as e:
        return str(e).removeprefix(f"shard {path} ")
    if count != entry["tokens"]:
        return f"holds {count:,} tokens, the manifest says {entry['tokens']:,}"
    if full:
        try:
            sha256, _ = scan_shard(path)
        except OSError as e:
            return f"cannot read it: {e.strerror or e}"
        if sha256 != entry["sha256"]:
            return "sha256 differs from the manifest: the file is corrupted"
    return None


def read_verify_failures(directory: str | os.PathLike, manifest: dict) -> dict[str, str]:
    """The listed shards that ``prepare --verify`` last found broken (name: problem), dropping records that no
    longer match the manifest (a shard since rebuilt with other contents, a directory re-prepared)."""
    path = Path(directory) / VERIFY_FAILURES_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        failures = record["shards"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # unreadable: prepare re-checks everything it would have named anyway
    sha256 = {entry["file"]: entry["sha256"] for entry in manifest["shards"]}
    return {name: f["problem"] for name, f in failures.items() if sha256.get(name) == f.get("sha256")}


def write_verify_failures(directory: str | os.PathLike, manifest: dict, failures: dict[str, str]) -> None:
    """Record (or, with no failures, clear) what ``--verify`` found, so that training refuses those shards and a
    re-run of ``prepare`` re-checks them fully and rebuilds them. Best effort: a read-only directory is left be."""
    path = Path(directory) / VERIFY_FAILURES_NAME
    sha256 = {entry["file"]: entry["sha256"] for entry in manifest["shards"]}
    try:
        if failures:
            shards = {name: {"problem": problem, "sha256": sha256[name]} for name, problem in failures.items()}
            from .flags import prepare_line  # it names the manifest file: imported here, not at the top

            atomic_write_json(path, {"written_by": prepare_line("--verify", str(directory)), "shards": shards})
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass
