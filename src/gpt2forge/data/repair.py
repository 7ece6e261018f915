"""Checking and mending a prepared directory: ``repair`` rebuilds broken shards of a complete directory
byte-identical to the originals; ``verify`` (``prepare --verify DIR``) reads every shard's sha256 and says which
command fixes what it finds.

Only the sha256 can see a corruption that keeps the size, and it reads everything (20 GB for FineWeb-Edu 10B;
minutes on network storage), so a plain re-run of ``prepare`` does not compute it: ``--verify`` does, and records
what it finds in ``verify-failures.json``, so that training refuses those shards and the plain re-run checks them
in full and rebuilds them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import UserError
from .flags import prepare_command
from .manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    Settings,
    listed_shard_problem,
    ordered_entry,
    read_manifest,
    write_verify_failures,
)
from .output import filesystem_error, save_or_explain, warn_if_short_of_space
from .shards import ShardError, read_header, shard_bytes, shard_files, shard_name, shard_sha256, write_shard
from .sources import Source
from .tokenize import Shard, ShardCutter, tokenize_into


def repair(source: Source, out: Path, settings: Settings, manifest: dict, broken: dict[str, str], *, workers: int,
           vocab_dir: str | None, progress: bool) -> None:
    """Rebuild the broken shards of a complete directory, byte-identical to the originals.

    The token stream is sequential, so it is re-tokenized from the end of the last intact shard before the first
    broken one (the ``end`` the manifest records, as a resume does) up to the last broken one. Broken shards are
    rewritten (atomically); the intact ones in between are only compared, and so are the rebuilt ones before they
    are written: a source that no longer gives the recorded sha256 is refused, leaving every file as it was,
    instead of mixing two versions of the data. Shards after the last broken one are not touched. The manifest
    changes only where an older one lacked ``max_token``.
    """
    entries = manifest["shards"]
    misplaced = [e["file"] for i, e in enumerate(entries) if e["file"] != shard_name(settings.prefix, e["split"], i)]
    if misplaced:
        raise UserError(f"{out / MANIFEST_NAME} lists shards out of order ({', '.join(misplaced[:3])}): it cannot "
                        "guide a repair. Prepare the directory again: the same command with --overwrite")
    indices = [i for i, entry in enumerate(entries) if entry["file"] in broken]
    first, last = indices[0], indices[-1]
    start = entries[first - 1]["end"] if first else {"row": 0, "token": 0}
    budget = sum(entry["tokens"] for entry in entries[first : last + 1])
    listing = "".join(f"\n  {name}: {problem}" for name, problem in broken.items())
    print(f"repairing {out}: {len(broken)} of {len(entries)} shards are broken:{listing}\nre-tokenizing shards "
          f"{first}..{last} from source row {start['row']:,}: the broken ones are rebuilt, the others in between "
          "only compared", file=sys.stderr)
    warn_if_short_of_space(out, sum(shard_bytes(entries[i]["tokens"]) for i in indices))
    repaired: list[str] = []
    before = list(entries)

    def rebuilt(shard: Shard) -> None:
        entry = entries[shard.index]
        if len(shard.tokens) != entry["tokens"] or shard_sha256(shard.tokens) != entry["sha256"]:
            raise UserError(
                f"cannot repair {out}: the source now gives other tokens for {entry['file']} than "
                f"{out / MANIFEST_NAME} records (sha256 differs), so it changed since {out} was prepared"
                f"{' (repaired so far: ' + ', '.join(repaired) + ')' if repaired else ''}. The other files are as "
                "they were. Prepare the directory again from scratch: the same command with --overwrite (or "
                "another --out)"
            )
        if entry["file"] in broken:
            try:
                write_shard(out / entry["file"], shard.tokens)
            except OSError as e:
                if e.errno is None:
                    raise
                needs = sum(shard_bytes(entries[i]["tokens"]) for i in indices if entries[i]["file"] not in repaired)
                raise filesystem_error(e, out / entry["file"], out, manifest, repair_needs=needs) from None
            repaired.append(entry["file"])
        if "max_token" not in entry:
            top = int(shard.tokens.max()) if entry["tokens"] else None
            entries[shard.index] = ordered_entry({**entry, "max_token": top})

    cutter = ShardCutter(settings, first, start, budget)
    tokenize_into(cutter, rebuilt, source, settings, start, workers=workers, vocab_dir=vocab_dir,
                  progress=progress, out=out, total=budget, initial=0)
    if len(repaired) < len(broken):
        missing = ", ".join(name for name in broken if name not in repaired)
        raise UserError(f"cannot repair {out}: the source ended before {missing} (it changed since {out} was "
                        "prepared). Prepare the directory again from scratch: the same command with --overwrite")
    if entries != before:
        save_or_explain(manifest, out)  # an older manifest's entries gained max_token
    write_verify_failures(out, manifest, {})
    print(f"{out}: repaired {', '.join(repaired)}; all {len(entries)} shards match {MANIFEST_NAME} again",
          file=sys.stderr)


def verify(directory: str | os.PathLike, *, record: bool = True) -> list[tuple[str, str | None]]:
    """Check every shard of a prepared directory: (file name, problem or None), manifest problems included.

    With a manifest, each listed shard's header, size, token count and sha256 are checked, and shard files it
    does not list are problems (training refuses them). Without one, headers and sizes only. With ``record``,
    the listed shards found broken are written to ``verify-failures.json`` (cleared when none are): training
    refuses them until they are repaired, and a re-run of ``prepare`` checks them in full and rebuilds them.
    """
    out = Path(directory)
    if not out.is_dir():
        raise UserError(f"--verify {out}: no such directory")
    try:
        manifest = read_manifest(out)
    except ShardError as e:
        return [(MANIFEST_NAME, str(e))]
    results: list[tuple[str, str | None]] = []
    if manifest is not None and manifest.get("format") != MANIFEST_FORMAT:
        results.append((MANIFEST_NAME, "not a gpt2forge prepare manifest: headers and sizes only"))
        manifest = None
    files = shard_files(out)
    listed = {entry["file"]: entry for entry in manifest["shards"]} if manifest else {}
    for name, entry in listed.items():
        results.append((name, listed_shard_problem(out, entry, full=True)))
    if record and manifest is not None:
        write_verify_failures(out, manifest, {name: problem for name, problem in results if problem})
    for path in files:
        if path.name in listed:
            continue
        try:
            read_header(path)
            problem = f"not listed in {MANIFEST_NAME} (left by an interrupted run?)" if manifest else None
        except ShardError as e:
            problem = str(e)
        results.append((path.name, problem))
    if manifest is not None and not manifest["complete"]:
        results.append((MANIFEST_NAME, "preparation is not finished: run the same prepare command again"))
    if not files and not listed:
        results.append((str(out), "no shard files (*_val_*.bin / *_train_*.bin)"))
    return results


def print_verification(out: Path, results: list[tuple[str, str | None]]) -> None:
    manifest_note = "" if (out / MANIFEST_NAME).is_file() else f" (no {MANIFEST_NAME}: headers and sizes only)"
    print(f"verifying {out}{manifest_note}")
    for name, problem in results:
        print(f"  {'OK  ' if problem is None else 'FAIL'}  {name}" + (f": {problem}" if problem else ""))
    failed = sum(problem is not None for _, problem in results)
    if failed:
        raise UserError(f"{out}: {failed} problem(s) found. {_what_to_do(out, results)}")
    print(f"{out}: all {len(results)} shards OK")


def _what_to_do(out: Path, results: list[tuple[str, str | None]]) -> str:
    """The commands that fix what ``verify`` found."""
    try:
        manifest = read_manifest(out)
    except ShardError:
        manifest = None
    if manifest is None or manifest.get("format") != MANIFEST_FORMAT:
        return ("Without a gpt2forge manifest nothing here can rebuild them: download or make the broken files "
                "again (or prepare the data with `gpt2forge prepare`)")
    listed = {entry["file"] for entry in manifest["shards"]}
    broken = [name for name, problem in results if problem and name in listed]
    stray = [name for name, problem in results if problem and name not in listed and name != MANIFEST_NAME]
    command = prepare_command(manifest["settings"], out)
    advice = []
    if not manifest["complete"]:
        advice.append(f"Finish it (broken shards are rebuilt on the way) with the command that made it:\n  {command}")
    elif broken:
        advice.append(f"Repair it with the command that made it: it re-checks the {len(broken)} broken shard(s) "
                      f"in full, rebuilds them and keeps the others:\n  {command}")
    if stray and manifest["complete"]:
        advice.append(f"Move {', '.join(stray)} out of {out}: {MANIFEST_NAME} does not list them (training "
                      "refuses the directory while they are there)")
    return "\n".join(advice)
