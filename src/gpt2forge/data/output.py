"""The output directory of ``prepare``: whether to start, resume or repair it (``open_output``), the shard writer,
and every filesystem failure as one message saying what is kept.

**Resume.** ``manifest.json`` is rewritten atomically after every shard. A re-run with the same settings checks
the listed shards against their sha256, removes any later shard files, and goes on from the last shard's end.
Other settings are refused, naming the options that differ (``flags.OPTION_NAMES``).

**Errors.** A full disk, an unwritable or read-only ``--out``, or an ``--out`` that is a file is one
``UserError`` naming the path, saying what was kept (every complete shard: a shard is listed only once it is
whole on disk, and a half-written one is removed) and that the same command resumes once the cause is fixed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..errors import UserError
from .flags import OPTION_NAMES, SOURCE_OPTIONS
from .manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    VERIFY_FAILURES_NAME,
    Settings,
    listed_shard_problem,
    new_manifest,
    ordered_entry,
    read_manifest,
    read_verify_failures,
    save_manifest,
    with_max_token,
)
from .shards import HEADER_BYTES, TOKEN_DTYPE, shard_bytes, shard_files, shard_name, write_shard
from .tokenize import Shard

WRITE_PROBE = ".prepare-write-test"


def _differences(old: dict, new: dict) -> list[str]:
    """The options whose values differ between two settings dicts, as 'option (was X, now Y)'."""

    def short(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."

    found = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "source" and old[key]["kind"] == new[key]["kind"]:
            found += _differences(old[key], new[key])
        elif key == "source":
            found.append(f"the source (was {SOURCE_OPTIONS[old[key]['kind']]}, now {SOURCE_OPTIONS[new[key]['kind']]})")
        else:
            found.append(f"{OPTION_NAMES.get(key, key)} (was {short(old.get(key))}, now {short(new.get(key))})")
    return found


def _leftovers(out: Path) -> list[Path]:
    """Temporary files of writes that were interrupted."""
    return [*out.glob("*.bin.tmp"), *out.glob(f".{MANIFEST_NAME}.*.tmp"), *out.glob(f"{WRITE_PROBE}.*.tmp"),
            *out.glob(f".{VERIFY_FAILURES_NAME}.*.tmp")]


def _remove_outputs(out: Path) -> None:
    for path in [*shard_files(out), out / MANIFEST_NAME, out / VERIFY_FAILURES_NAME, *_leftovers(out)]:
        path.unlink(missing_ok=True)


def open_output(out: Path, settings: Settings, overwrite: bool, *, verify: bool = False) -> tuple[dict, dict]:
    """The manifest to continue, and the broken shards of a complete one (name: problem; empty when intact).

    New: an empty manifest. Unfinished (resumed): every listed shard's sha256 is checked (the tokenizing still to
    do dwarfs reading what is done), the first broken one and everything after it are removed. Complete: each
    listed shard's header, size and token count are checked (a stat and a 1 KiB read each, so that "nothing to
    do" stays instant on 100 GB); its sha256 only with ``verify``, or for the shards ``prepare --verify`` last
    found corrupted (``verify-failures.json``), which is how a same-size corruption that only a full read can see
    gets repaired by the plain command.
    """
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a directory: give a directory path (it is created)")
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            _remove_outputs(out)
        return _open_manifest(out, settings, verify)
    except OSError as e:
        if e.errno is None:
            raise
        raise filesystem_error(e, Path(e.filename or out), out, None) from None


def _open_manifest(out: Path, settings: Settings, verify: bool) -> tuple[dict, dict]:
    manifest = read_manifest(out)
    if manifest is None:
        if shard_files(out):
            raise UserError(
                f"{out} holds shard files but no {MANIFEST_NAME}, so they cannot be resumed; "
                "use another --out, or --overwrite to delete them"
            )
        return new_manifest(settings), {}
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{out / MANIFEST_NAME} is not a gpt2forge prepare manifest; use another --out")
    if manifest["settings"] != settings.as_json():
        differences = "; ".join(_differences(manifest["settings"], settings.as_json()))
        raise UserError(
            f"{out} was prepared with other settings: {differences}. Use another --out, or --overwrite to replace it"
        )
    if manifest["complete"]:
        recorded = read_verify_failures(out, manifest)
        broken = {}
        for entry in manifest["shards"]:
            full = verify or entry["file"] in recorded
            problem = listed_shard_problem(out, entry, full=full)
            if problem is not None:
                broken[entry["file"]] = problem + (" (found by --verify)" if entry["file"] in recorded else "")
        return manifest, broken
    kept = []
    for entry in manifest["shards"]:
        problem = listed_shard_problem(out, entry, full=True)
        if problem is not None:
            print(f"{entry['file']} does not match the manifest: rebuilding from there ({problem})", file=sys.stderr)
            break
        kept.append(with_max_token(out, entry))
    kept_names = {entry["file"] for entry in kept}
    for path in [*shard_files(out, settings.prefix), *_leftovers(out)]:
        if path.name not in kept_names:
            path.unlink()  # written after the last listed shard, or a half-written temporary file
    manifest["shards"] = kept
    return manifest, {}


def _size(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError


def _still_needed(manifest: dict) -> str:
    """The disk space the rest of a run needs, as far as its settings tell."""
    settings, done = manifest["settings"], sum(entry["tokens"] for entry in manifest["shards"])
    shard = _size(shard_bytes(settings["shard_size"]))
    if settings["max_tokens"] is None:
        return f"one shard ({shard}) to go on, and space for the rest of the source"
    left = settings["max_tokens"] - done
    needed = left * TOKEN_DTYPE.itemsize + -(-left // settings["shard_size"]) * HEADER_BYTES
    return f"{_size(needed)} for the rest of the run (--max-tokens)"


def filesystem_error(e: OSError, path: Path, out: Path, manifest: dict | None, *,
                     repair_needs: int | None = None) -> UserError:
    """One clear message for an operating-system error writing the output: what happened to which path, what is
    kept, and what to do. ``repair_needs``: a repair failed, which needs this many more bytes."""
    reason = f"{e.strerror or e} [{errno.errorcode.get(e.errno, e.errno)}]"
    if e.errno in (errno.EACCES, errno.EPERM):
        return UserError(f"cannot write {path}: {reason}. Choose a --out you can write to, or fix the permissions "
                         f"of {out}; then run the same command again")
    if e.errno == errno.EROFS:
        return UserError(f"cannot write {path}: {out} is on a read-only file system. Choose another --out")
    if e.errno in (errno.ENOTDIR, errno.EEXIST) and manifest is None:
        return UserError(f"cannot create --out {out}: {reason} (part of the path is a file?). Give a directory path")
    if manifest is None:
        return UserError(f"cannot use --out {out} ({path}): {reason}")
    shards = manifest["shards"]
    tokens = sum(entry["tokens"] for entry in shards)
    repair = repair_needs is not None
    if repair:
        kept = ("The shards repaired so far are complete; the others are as they were, and "
                f"{out / MANIFEST_NAME} is unchanged. ")
        again = "run the same command again: it goes on repairing"
    else:
        kept = (f"Nothing is lost: the {len(shards)} shard(s) finished so far ({tokens:,} tokens, "
                f"{_size(sum(shard_bytes(entry['tokens']) for entry in shards))}) are complete and listed in "
                f"{out / MANIFEST_NAME}, and no half-written shard is left. ")
        again = "run the same command again: it resumes after the last complete shard"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return UserError(f"{what} holding {out}, while writing {path.name} [{errno.errorcode[e.errno]}]. {kept}"
                         f"Free at least {_size(repair_needs) if repair else _still_needed(manifest)}, then {again}")
    return UserError(f"writing {path} failed: {reason}. {kept}Fix the cause, then {again}")


def check_writable(out: Path) -> None:
    """Fail before any tokenizing where ``out`` cannot take a file (permissions, a read-only file system)."""
    probe = out / f"{WRITE_PROBE}.{os.getpid()}.tmp"
    try:
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as e:
        if e.errno is None:
            raise
        raise filesystem_error(e, out, out, None) from None


def warn_if_short_of_space(out: Path, needed: int | None) -> None:
    if needed is None:
        return
    free = shutil.disk_usage(out).free
    if free < needed:
        print(f"warning: {out} has {_size(free)} free, and this run needs about {_size(needed)}: it will stop when "
              "the disk is full (keeping every complete shard; the same command then resumes)", file=sys.stderr)


class ShardWriter:
    """Writes shards in order on a background thread, so that the next shard fills while one goes to disk.

    Each shard is written (atomically, fsynced) before the manifest that lists it, so a listed shard is always
    complete on disk. At most one shard waits for the disk: ``write`` blocks until the previous one is done, and
    raises what went wrong with it (an operating-system error as a ``UserError`` saying what is kept).
    """

    def __init__(self, manifest: dict, out: Path) -> None:
        self.manifest, self.out = manifest, out
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self.pending: Future | None = None

    def write(self, shard: Shard) -> None:
        self.wait()
        self.pending = self.thread.submit(self._record, shard)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        self.thread.shutdown(wait=True)

    def _record(self, shard: Shard) -> None:
        name = shard_name(self.manifest["settings"]["prefix"], shard.split, shard.index)
        try:
            sha256 = write_shard(self.out / name, shard.tokens)
        except OSError as e:
            if e.errno is None:
                raise
            raise filesystem_error(e, self.out / name, self.out, self.manifest) from None
        max_token = int(shard.tokens.max()) if len(shard.tokens) else None
        self.manifest["shards"].append(ordered_entry({"file": name, "split": shard.split, "tokens": len(shard.tokens),
                                               "documents": shard.documents, "max_token": max_token,
                                               "sha256": sha256, "end": shard.end}))
        try:
            save_manifest(self.manifest, self.out)
        except OSError as e:
            self.manifest["shards"].pop()  # on disk but not listed: a resume removes it and writes it again
            if e.errno is None:
                raise
            raise filesystem_error(e, self.out / MANIFEST_NAME, self.out, self.manifest) from None


def save_or_explain(manifest: dict, out: Path) -> None:
    """``save_manifest``, with an operating-system error as the message saying what is kept."""
    try:
        save_manifest(manifest, out)
    except OSError as e:
        if e.errno is None:
            raise
        raise filesystem_error(e, out / MANIFEST_NAME, out, manifest) from None
