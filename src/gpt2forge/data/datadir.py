"""Opening a prepared directory for training or evaluation (``check_data_dir``): cheap checks of everything that
can be checked cheaply, each refusal naming the directory or shard and the command that fixes it.

With a manifest (ours): the manifest must say ``complete``; every listed shard must exist with a valid header, its
size must match its token count, and no unlisted ``*_val_*.bin`` / ``*_train_*.bin`` may lie beside them (the
loader would otherwise silently read a different dataset than the one prepared, or ignore files the user meant to
add); and shards that ``prepare --verify`` found corrupted stay refused until repaired. These are a stat and a
1 KiB read per shard. The sha256 of every byte (20 GB for FineWeb-Edu 10B, minutes) stays ``prepare --verify``'s
job. Without a manifest (llm.c's or modded-nanogpt's published shards) each shard's header and size are still
checked as it is opened, and one warning says that nothing can tell whether shards are missing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .flags import missing_data_hint, prepare_command, prepare_line
from .manifest import MANIFEST_FORMAT, MANIFEST_NAME, listed_shard_problem, read_manifest, read_verify_failures
from .shards import SPLITS, ShardError, shard_max_token, split_globs

log = logging.getLogger("gpt2forge.data")


@dataclass
class DataInfo:
    """A checked data directory: each split's shards in reading order, and what its manifest says of them."""

    directory: Path
    manifest: dict | None  # None: not made by `gpt2forge prepare`, so nothing says what should be there
    shards: dict[str, list[Path]] = field(default_factory=dict)

    def paths(self, split: str) -> list[Path]:
        """The shards of ``split``, refusing a split with none."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self.shards[split]:
            return self.shards[split]
        directory = self.directory
        settings = (self.manifest or {}).get("settings", {})
        if self.manifest is not None and split == "val" and settings.get("val_tokens") == 0:
            raise UserError(f"{directory} has no val shards: it was prepared with --val-tokens 0. Prepare it "
                            "again into another --out with a validation split (e.g. --val-tokens 10M)")
        if self.manifest is not None and split == "train":
            raise UserError(f"{directory} has no train shards: the source ended inside the validation split "
                            f"(--val-tokens {settings.get('val_tokens', 0):,}); prepare it again into another "
                            "--out with a smaller --val-tokens")
        raise UserError(f"no {split} shards (*_{split}_*.bin) in {directory}; {missing_data_hint(directory)}")

    def check_vocab(self, split: str, vocab_size: int) -> None:
        """Refuse shards of ``split`` holding a token id the model has no embedding for. The largest id of each
        shard comes from the manifest's ``max_token`` where it records one (the shard's size was checked), else
        from a scan of the memory-mapped shard (``shard_max_token``)."""
        recorded = {e["file"]: e["max_token"] for e in (self.manifest or {}).get("shards", []) if "max_token" in e}
        started, scanned = time.perf_counter(), 0
        for path in self.paths(split):
            if path.name in recorded:
                top = recorded[path.name]
            else:
                top, scanned = shard_max_token(path), scanned + 1
            if top is not None and top >= vocab_size:
                tokenizer = ((self.manifest or {}).get("settings") or {}).get("tokenizer") or {}
                made_with = (f" ({self.directory / MANIFEST_NAME} says it was made with the "
                             f"{tokenizer['name']!r} tokenizer)" if "name" in tokenizer else "")
                raise UserError(
                    f"{path} holds token id {top:,}, but the model's vocabulary has {vocab_size:,} ids "
                    f"(0..{vocab_size - 1:,}){made_with}. Either the shards were made with another tokenizer than "
                    "the model's, or the model's vocab_size is too small for this data (GPT-2's tokenizer needs "
                    f"50,257). Use shards made with the model's tokenizer, or a model with vocab_size > {top:,}"
                )
        seconds = time.perf_counter() - started
        if seconds > 5:
            log.info("scanned %d %s shards of %s for their largest token id in %.0f s (no max_token recorded)",
                     scanned, split, self.directory, seconds)


_warned_unchecked: set[str] = set()


def check_data_dir(directory: str | os.PathLike) -> DataInfo:
    """Check a data directory before anything reads it for training or evaluation (see the module docstring):
    cheap checks only, every refusal a ``UserError`` naming the directory or shard and the command that fixes it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"data directory {directory} does not exist; {missing_data_hint(directory)}")
    manifest = read_manifest(directory)
    if manifest is not None and manifest.get("format") != MANIFEST_FORMAT:
        manifest = None  # someone else's manifest.json: nothing we can check against
    if manifest is None:
        key = str(directory.resolve())
        if key not in _warned_unchecked:
            _warned_unchecked.add(key)
            log.warning("%s has no gpt2forge %s (shards from another tool?): each shard's header and size are "
                        "checked, but not whether shards are missing or complete", directory, MANIFEST_NAME)
        found = split_globs(directory)
        return DataInfo(directory, None, {split: [p for p in found if f"_{split}_" in p.name] for split in SPLITS})
    command = prepare_command(manifest.get("settings", {}), directory)
    if not manifest.get("complete"):
        raise UserError(f"{directory} is not finished (`gpt2forge prepare` was interrupted, or is still running): "
                        f"{_progress_note(manifest)}. Training now would read only part of the data. Finish it with "
                        f"the command that made it (it resumes where it stopped):\n  {command}")
    recorded = read_verify_failures(directory, manifest)
    problems = {}
    for entry in manifest["shards"]:
        problem = listed_shard_problem(directory, entry)
        if problem is None and entry["file"] in recorded:
            problem = f"{recorded[entry['file']]} (found by `{prepare_line('--verify', str(directory))}`)"
        if problem is not None:
            problems[entry["file"]] = problem
    if problems:
        listing = "\n".join(f"  {name}: {problem}" for name, problem in problems.items())
        raise ShardError(
            f"{directory} has {len(problems)} broken shard(s) that {MANIFEST_NAME} lists:\n{listing}\n"
            f"`{prepare_line('--verify', str(directory))}` checks every shard; this command rebuilds the broken ones "
            f"(and keeps the others):\n  {command}"
        )
    listed = {entry["file"] for entry in manifest["shards"]}
    unlisted = [p.name for p in split_globs(directory) if p.name not in listed]
    if unlisted:
        raise UserError(
            f"{directory} holds shard files that its {MANIFEST_NAME} does not list: {', '.join(unlisted)} (copied "
            "in, or left by another run?). Training reads what the manifest lists, so they would be silently "
            "left out: move them to another directory, or delete them; to train on other shards, give them a "
            "directory of their own"
        )
    shards = {split: [directory / e["file"] for e in manifest["shards"] if e["split"] == split] for split in SPLITS}
    return DataInfo(directory, manifest, shards)


def _progress_note(manifest: dict) -> str:
    """How far an unfinished ``prepare`` got, against its plan where the settings fix one."""
    shards = manifest.get("shards", [])
    tokens = sum(entry["tokens"] for entry in shards)
    settings = manifest.get("settings", {})
    done = f"{MANIFEST_NAME} lists {len(shards)} shard(s), {tokens:,} tokens,"
    planned = settings.get("max_tokens")
    if planned is None:
        return f"{done} of the whole source (whose size is known only once it is read)"
    size, val = settings["shard_size"], min(settings["val_tokens"], planned)
    count = -(-val // size) + -(-(planned - val) // size)
    return f"{done} of the {planned:,} tokens ({count} shards) planned"
