"""Training never reads incomplete or broken data, and ``prepare`` repairs what ``--verify`` finds broken.

Each test prepares a small local JSON Lines corpus (about half a second once ``datasets`` is imported) and then
breaks the result the way the fault campaign did: an interrupted run, missing / truncated / corrupted shards, a
stray shard, token ids beyond the model's vocabulary, a full disk, an unwritable output directory.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
from pathlib import Path

import numpy as np
import pytest

import gpt2forge.data.datadir as datadir_module
import gpt2forge.data.output as output_module
import gpt2forge.data.tokenize as tokenize_module
from gpt2forge.cli import main
from gpt2forge.data.datadir import check_data_dir
from gpt2forge.data.loader import TokenLoader, find_shards, val_batches
from gpt2forge.data.prepare import prepare
from gpt2forge.data.repair import verify
from gpt2forge.data.shards import ShardError, open_shard, write_shard
from gpt2forge.data.sources import FileSource, embedded_documents
from gpt2forge.errors import UserError

T = 16
OPTIONS = {"shard_size": 1500, "val_tokens": 1000, "max_tokens": 15000, "prefix": "fw", "workers": 2,
           "progress": False}
SHARDS = 11  # 1 val shard of 1000 tokens, 9 train shards of 1500, a last one of 500


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~240 English documents of uneven length (pydoc's topic pages) as JSON Lines."""
    paragraphs = [p for doc in embedded_documents()[:40] for p in doc.split("\n\n") if p.strip()]
    texts = [" ".join(paragraphs[i : i + 1 + i % 5]) for i in range(0, 720, 3)]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def run_prepare(corpus: Path, out: Path, **options) -> dict:
    return prepare(FileSource([str(corpus)]), out, **{**OPTIONS, **options})


@pytest.fixture(scope="module")
def clean(corpus, tmp_path_factory) -> Path:
    """An uninterrupted run: what every interrupted, broken and repaired run must end up byte-identical to."""
    out = tmp_path_factory.mktemp("clean") / "data"
    run_prepare(corpus, out)
    return out


@pytest.fixture
def prepared(corpus, tmp_path) -> Path:
    out = tmp_path / "data"
    run_prepare(corpus, out)
    return out


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def names(out: Path) -> list[str]:
    return [entry["file"] for entry in manifest_of(out)["shards"]]


def run_command(command: str, capsys) -> tuple[int, str]:
    """Run a ``gpt2forge ...`` command line that a message printed; (exit code, stderr)."""
    argv = shlex.split(command)
    assert argv[0] == "gpt2forge"
    code = main([*argv[1:], "--no-progress"] if argv[1] == "prepare" else argv[1:])
    return code, capsys.readouterr().err


def command_in(message: str) -> str:
    """The indented ``gpt2forge prepare ...`` line of a message."""
    return next(line.strip() for line in message.splitlines() if line.strip().startswith("gpt2forge prepare --"))


# ---------------------------------------------------------------- opening data for training


def test_interrupted_prepare_is_refused_with_the_command_that_finishes_it(corpus, clean, tmp_path, monkeypatch,
                                                                         capsys):
    out = tmp_path / "data"
    real_write, calls = output_module.write_shard, []

    def interrupted_write(path, tokens):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C while the 4th shard is written
        return real_write(path, tokens)

    monkeypatch.setattr(output_module, "write_shard", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(corpus, out)
    monkeypatch.setattr(output_module, "write_shard", real_write)
    assert not manifest_of(out)["complete"] and len(names(out)) == 3

    for attempt in (lambda: TokenLoader(out, 2, T), lambda: val_batches(out, 2, T), lambda: find_shards(out, "val")):
        with pytest.raises(UserError) as refused:
            attempt()
        message = str(refused.value)
        assert f"{out} is not finished" in message
        assert "manifest.json lists 3 shard(s), 4,000 tokens, of the 15,000 tokens (11 shards) planned" in message
    command = command_in(message)
    assert f"--files {corpus}" in command and command.endswith(f"--out {out}")

    capsys.readouterr()
    code, err = run_command(command, capsys)  # the command the message gives is the one that finishes it
    assert code == 0 and "resuming" in err
    assert files_of(out) == files_of(clean)
    assert TokenLoader(out, 2, T).sequences_per_epoch > 0


def test_missing_truncated_and_verify_found_shards_are_refused_naming_them(prepared):
    shard = names(prepared)
    truncated, missing = prepared / shard[3], prepared / shard[0]  # a train shard, and the (only) val shard
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(ShardError) as refused:
        TokenLoader(prepared, 2, T)
    message = str(refused.value)
    assert f"{shard[3]}: is 4014 bytes but its header promises 1,500 tokens (4024 bytes): truncated" in message
    assert f"gpt2forge prepare --verify {prepared}" in message and command_in(message).endswith(f"--out {prepared}")

    missing.unlink()
    with pytest.raises(ShardError, match=rf"2 broken shard\(s\)(.|\n)*{shard[0]}: missing"):
        val_batches(prepared, 2, T)  # checked when called, not at the first batch

    # a same-size corruption only a full read sees: refused once --verify has found it
    corrupt = prepared / shard[5]
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 1
    corrupt.write_bytes(bytes(data))
    verify(prepared)
    found_by = rf"\(found by `gpt2forge prepare --verify {prepared}`\)"
    with pytest.raises(ShardError, match=rf"{shard[5]}: sha256 differs .* {found_by}"):
        TokenLoader(prepared, 2, T)


def test_shards_the_manifest_does_not_list_are_refused(prepared, corpus, capsys):
    stray = prepared / "other_train_000042.bin"
    write_shard(stray, np.arange(100, dtype=np.uint16))
    with pytest.raises(UserError, match=r"holds shard files that its manifest.json does not list: "
                                        r"other_train_000042.bin .*move them to another directory"):
        TokenLoader(prepared, 2, T)
    run_prepare(corpus, prepared)  # prepare leaves a file it did not write alone, but says so
    assert "also holds other_train_000042.bin" in capsys.readouterr().err and stray.exists()
    stray.unlink()
    TokenLoader(prepared, 2, T)


def test_a_directory_without_manifest_is_accepted_with_one_warning(tmp_path, caplog):
    data = tmp_path / "llmc"
    data.mkdir()
    write_shard(data / "fineweb_val_000000.bin", np.arange(200, dtype=np.uint16))
    write_shard(data / "fineweb_train_000001.bin", np.arange(300, dtype=np.uint16))
    with caplog.at_level(logging.WARNING, logger="gpt2forge.data"):
        loader = TokenLoader(data, 2, T)
        list(val_batches(data, 2, T))
        list(val_batches(data, 2, T))  # evaluated again and again during training: still one warning
    warnings = [r for r in caplog.records if r.name == "gpt2forge.data" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(data) in warnings[0].getMessage()
    assert "not whether shards are missing" in warnings[0].getMessage()
    assert loader.sequences_per_epoch == 299 // T
    assert check_data_dir(data).manifest is None


def test_a_missing_split_is_named(corpus, tmp_path):
    out = tmp_path / "noval"
    run_prepare(corpus, out, val_tokens=0, max_tokens=3000)
    with pytest.raises(UserError, match="has no val shards: it was prepared with --val-tokens 0"):
        val_batches(out, 2, T)
    TokenLoader(out, 2, T)


# ---------------------------------------------------------------- token ids against the model's vocabulary


def test_token_ids_beyond_the_vocabulary_are_refused_from_the_manifest(prepared, monkeypatch):
    entries = manifest_of(prepared)["shards"]
    assert max(entry["max_token"] for entry in entries) == 50256  # EOT ends each document
    first_train = next(e["file"] for e in entries[1:] if e["max_token"] >= 50000)

    def no_scan(path):
        raise AssertionError(f"scanned {path}: the manifest records max_token")

    monkeypatch.setattr(datadir_module, "shard_max_token", no_scan)
    TokenLoader(prepared, 2, T, vocab_size=50257)
    TokenLoader(prepared, 2, T, vocab_size=50304)
    with pytest.raises(UserError) as refused:
        TokenLoader(prepared, 2, T, vocab_size=50000)
    message = str(refused.value)
    assert f"{prepared / first_train} holds token id 50,256" in message
    assert "vocabulary has 50,000 ids" in message and "another tokenizer" in message and "'gpt2'" in message
    with pytest.raises(UserError, match=rf"{entries[0]['file']} holds token id {entries[0]['max_token']:,}"):
        val_batches(prepared, 2, T, vocab_size=entries[0]["max_token"])


def test_token_ids_beyond_the_vocabulary_are_found_by_a_scan_without_max_token(tmp_path, prepared, monkeypatch):
    data = tmp_path / "llmc"  # no manifest: each shard is scanned
    data.mkdir()
    write_shard(data / "x_val_000000.bin", np.arange(200, dtype=np.uint16))
    write_shard(data / "x_train_000001.bin", np.r_[np.arange(300), 60000].astype(np.uint16))
    TokenLoader(data, 2, T, vocab_size=60001)
    list(val_batches(data, 2, T, vocab_size=200))
    with pytest.raises(UserError, match=r"x_train_000001.bin holds token id 60,000, but the model's vocabulary has "
                                        r"50,304 ids"):
        TokenLoader(data, 2, T, vocab_size=50304)
    with pytest.raises(UserError, match=r"x_val_000000.bin holds token id 199"):
        val_batches(data, 2, T, vocab_size=199)

    # an older manifest, without max_token: still valid, and the shards are scanned instead
    manifest = manifest_of(prepared)
    first_eot = next(e["file"] for e in manifest["shards"][1:] if e["max_token"] == 50256)
    for entry in manifest["shards"]:
        del entry["max_token"]
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    scanned = []
    real_scan = datadir_module.shard_max_token
    monkeypatch.setattr(datadir_module, "shard_max_token", lambda path: scanned.append(path.name) or real_scan(path))
    TokenLoader(prepared, 2, T, vocab_size=50257)
    assert scanned == names(prepared)[1:]  # the train split's shards
    with pytest.raises(UserError, match=rf"{first_eot} holds token id 50,256"):
        TokenLoader(prepared, 2, T, vocab_size=50256)


def test_an_older_manifest_without_max_token_resumes_byte_identically(corpus, clean, tmp_path):
    out = tmp_path / "data"
    run_prepare(corpus, out)
    manifest = manifest_of(out)
    manifest["complete"] = False
    manifest["shards"] = [{k: v for k, v in entry.items() if k != "max_token"} for entry in manifest["shards"][:4]]
    (out / "manifest.json").write_text(json.dumps(manifest))
    for name in names(clean)[4:]:
        (out / name).unlink()
    run_prepare(corpus, out)  # the settings are unchanged: resumed, and max_token filled in where it was missing
    assert files_of(out) == files_of(clean)


# ---------------------------------------------------------------- prepare repairs


def test_verify_finds_broken_shards_and_the_command_it_gives_repairs_them(prepared, clean, capsys):
    shard = names(prepared)
    before = {name: (prepared / name).stat() for name in shard}
    corrupt, truncated, missing = prepared / shard[2], prepared / shard[4], prepared / shard[6]
    data = bytearray(corrupt.read_bytes())
    data[2000] ^= 0xFF  # same size, other bytes: only the sha256 sees it
    corrupt.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-2])
    missing.unlink()

    assert main(["prepare", "--verify", str(prepared)]) == 2
    captured = capsys.readouterr()
    assert f"FAIL  {shard[2]}: sha256 differs" in captured.out and f"FAIL  {shard[4]}: is 4022 bytes" in captured.out
    assert f"FAIL  {shard[6]}: missing" in captured.out and "3 problem(s) found" in captured.err
    assert "Repair it with the command that made it" in captured.err

    code, err = run_command(command_in(captured.err), capsys)
    assert code == 0
    assert f"repairing {prepared}: 3 of {SHARDS} shards are broken" in err and "re-tokenizing shards 2..6" in err
    assert f"repaired {shard[2]}, {shard[4]}, {shard[6]}" in err
    assert files_of(prepared) == files_of(clean)  # verify-failures.json is gone too
    for name in [*shard[:2], shard[3], shard[5], *shard[7:]]:  # intact shards were compared, not rewritten
        now = (prepared / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns)

    assert main(["prepare", "--verify", str(prepared)]) == 0
    code, err = run_command(command_in(captured.err), capsys)
    assert code == 0 and "nothing to do" in err and "sizes and headers checked" in err


def test_a_plain_rerun_checks_sizes_and_verify_true_checks_every_byte(prepared, clean, corpus, capsys):
    shard = names(prepared)
    corrupt = prepared / shard[1]
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 1
    corrupt.write_bytes(bytes(data))
    run_prepare(corpus, prepared)  # sizes only: a same-size corruption is not seen without --verify's record
    assert "nothing to do" in capsys.readouterr().err and files_of(prepared) != files_of(clean)
    run_prepare(corpus, prepared, verify=True)
    assert f"{shard[1]}: sha256 differs" in capsys.readouterr().err
    assert files_of(prepared) == files_of(clean)


def test_a_repair_from_a_changed_source_is_refused_and_touches_nothing(prepared, corpus, tmp_path):
    """A source edited since (same size, so the settings cannot tell) would give a dataset mixing two versions."""
    tokens = np.concatenate([np.asarray(open_shard(prepared / name)) for name in names(prepared)])
    in_shard_1 = int((tokens[:2000] == 50256).sum())  # the document holding token 2000, in shard 1 (1000..2499)
    lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
    assert "a" in lines[in_shard_1]
    lines[in_shard_1] = lines[in_shard_1].replace("a", "e")
    changed = tmp_path / "changed" / corpus.name
    changed.parent.mkdir()
    changed.write_text("".join(lines), encoding="utf-8")
    manifest = manifest_of(prepared)
    manifest["settings"]["source"]["files"][0]["path"] = str(changed.resolve())
    (prepared / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (prepared / names(prepared)[1]).unlink()
    before = files_of(prepared)
    with pytest.raises(UserError, match=r"the source now gives other tokens for fw_train_000001.bin .* --overwrite"):
        run_prepare(changed, prepared)
    assert files_of(prepared) == before


# ---------------------------------------------------------------- filesystem errors


def fail_fsync_of(monkeypatch, suffix: str, nth: int, error: int = errno.ENOSPC) -> None:
    """Make the ``nth`` fsync of a file whose name ends with ``suffix`` fail with ``error``, as a full disk
    does (with delayed allocation, ENOSPC often surfaces at fsync): the data was written to the file before."""
    real_fsync, seen = os.fsync, []

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
            seen.append(fd)
            if len(seen) == nth:
                raise OSError(error, os.strerror(error))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file is fsynced")
@pytest.mark.parametrize("failing", ["shard", "manifest"])
def test_a_full_disk_is_one_message_and_the_same_command_resumes(corpus, clean, tmp_path, monkeypatch, failing):
    out = tmp_path / "data"
    fail_fsync_of(monkeypatch, ".bin.tmp" if failing == "shard" else f"manifest.json.{os.getpid()}.tmp", 4)
    with pytest.raises(UserError) as refused:
        run_prepare(corpus, out)
    monkeypatch.undo()
    message = str(refused.value)
    assert f"no space left on the device holding {out}" in message and "[ENOSPC]" in message
    assert "the 3 shard(s) finished so far (4,000 tokens, 11.1 kB) are complete" in message
    assert "Free at least 30.2 kB for the rest of the run" in message and "run the same command again" in message
    assert not list(out.glob("*.tmp"))  # no half-written file left
    manifest = manifest_of(out)
    assert not manifest["complete"] and names(out) == names(clean)[:3]
    assert all(files_of(out)[name] == files_of(clean)[name] for name in names(out))
    with pytest.raises(UserError, match="is not finished"):
        TokenLoader(out, 2, T)
    run_prepare(corpus, out)
    assert files_of(out) == files_of(clean)


def test_a_full_disk_during_a_repair_keeps_the_directory_repairable(prepared, clean, corpus, monkeypatch):
    shard = names(prepared)
    for name in (shard[3], shard[8]):
        (prepared / name).unlink()
    fail_fsync_of(monkeypatch, ".bin.tmp", 2)  # shard 3 is rebuilt, shard 8 hits the full disk
    with pytest.raises(UserError, match=r"no space left .* The shards repaired so far are complete; .* goes on "
                                        r"repairing"):
        run_prepare(corpus, prepared)
    monkeypatch.undo()
    assert (prepared / shard[3]).exists() and not list(prepared.glob("*.tmp"))
    run_prepare(corpus, prepared)
    assert files_of(prepared) == files_of(clean)


def test_unwritable_or_wrong_output_paths_are_one_clear_message(corpus, tmp_path, monkeypatch, capsys):
    args = ["prepare", "--files", str(corpus), "--shard-size", "1500", "--no-progress", "--out"]

    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    assert main([*args, str(a_file)]) == 2
    assert f"--out {a_file} is a file, not a directory" in capsys.readouterr().err
    assert main([*args, str(a_file / "below")]) == 2
    assert f"cannot create --out {a_file / 'below'}" in capsys.readouterr().err

    def no_workers(*_, **__):
        raise AssertionError("tokenizing started before the output was found unwritable")

    monkeypatch.setattr(tokenize_module, "start_pool", no_workers)
    real_open = open

    def unwritable(path, mode="r", *rest, **kwargs):  # root ignores permissions: simulate what a user would meet
        if "w" in mode and str(path).startswith(str(tmp_path / "locked")):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, mode, *rest, **kwargs)

    monkeypatch.setattr("builtins.open", unwritable)
    assert main([*args, str(tmp_path / "locked")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'locked'}: Permission denied [EACCES]" in err and "Traceback" not in err

    def read_only(path, mode="r", *rest, **kwargs):
        if "w" in mode and str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *rest, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    assert main([*args, str(tmp_path / "ro")]) == 2
    assert f"{tmp_path / 'ro'} is on a read-only file system. Choose another --out" in capsys.readouterr().err
