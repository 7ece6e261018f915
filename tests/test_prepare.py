"""``gpt2forge prepare``: sources, token stream, shards + manifest, exact resume, refusals, --verify, bad input."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gpt2forge.data.output as output_module
import gpt2forge.data.prepare as prepare_module
from gpt2forge.cli import main
from gpt2forge.data.manifest import Settings
from gpt2forge.data.prepare import prepare
from gpt2forge.data.shards import file_sha256, open_shard, read_header
from gpt2forge.data.sources import EmbeddedSource, FileSource, HubSource, embedded_documents
from gpt2forge.errors import UserError
from gpt2forge.tokenizer import get_tokenizer

EOT = 50256
SPECIAL = ["naïve café — 東京都 😀", "a literal <|endoftext|> inside a document is text", "x"]


def fineweb_table(texts: list[str], first_id: int = 0) -> pa.Table:
    """FineWeb-Edu's column layout, with int_score cycling 1..4."""
    n = len(texts)
    scores = [1.0 + ((first_id + i) % 4) + 0.2 for i in range(n)]
    return pa.table({
        "text": texts,
        "id": [f"<urn:uuid:{first_id + i}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{first_id + i}" for i in range(n)],
        "file_path": ["s3://commoncrawl/x.warc.gz"] * n,
        "language": ["en"] * n,
        "language_score": [0.95] * n,
        "token_count": [len(t) // 4 for t in texts],
        "score": scores,
        "int_score": [round(s) for s in scores],
    })


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """~240 real-English documents of uneven length (pydoc's topic pages), plus unicode and a fake EOT."""
    paragraphs = [p for doc in embedded_documents()[:40] for p in doc.split("\n\n") if p.strip()]
    return SPECIAL + [" ".join(paragraphs[i : i + 1 + i % 5]) for i in range(0, 720, 3)]


@pytest.fixture
def parquet_dir(tmp_path, texts):
    directory = tmp_path / "fineweb"
    directory.mkdir()
    half = len(texts) // 2
    pq.write_table(fineweb_table(texts[:half]), directory / "000_00000.parquet", row_group_size=50)
    pq.write_table(fineweb_table(texts[half:], half), directory / "001_00000.parquet", row_group_size=50)
    return directory


def stream(out) -> np.ndarray:
    manifest = json.loads((out / "manifest.json").read_text())
    return np.concatenate([np.asarray(open_shard(out / s["file"])) for s in manifest["shards"]])


def documents_of(tokens: np.ndarray) -> list[str]:
    """Decode a token stream back into documents, splitting at EOT (a trailing piece has none)."""
    cuts = np.flatnonzero(tokens == EOT)
    pieces = np.split(tokens, cuts + 1)
    decode = get_tokenizer().decode
    return [decode(p[:-1].tolist()) for p in pieces[:-1]] + ([decode(pieces[-1].tolist())] if len(pieces[-1]) else [])


def files_of(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_parquet_in_fineweb_layout_becomes_shards_that_decode_back(parquet_dir, texts, tmp_path):
    out = tmp_path / "out"
    manifest = prepare(FileSource([str(parquet_dir / "*.parquet")]), out, shard_size=3000, val_tokens=5000,
                       prefix="fw", workers=2, progress=False)
    assert documents_of(stream(out)) == texts  # every document, in order, each followed by EOT
    shards = manifest["shards"]
    assert [s["file"] for s in shards[:3]] == ["fw_val_000000.bin", "fw_val_000001.bin", "fw_train_000002.bin"]
    assert [s["tokens"] for s in shards[:3]] == [3000, 2000, 3000] and 0 < shards[-1]["tokens"] <= 3000
    for s in shards:
        assert read_header(out / s["file"]) == s["tokens"] and file_sha256(out / s["file"]) == s["sha256"]
    tokens = stream(out)
    assert manifest["totals"]["tokens"] == len(tokens) == sum(s["tokens"] for s in shards)
    assert sum(s["documents"] for s in shards) == len(texts) == int((tokens == EOT).sum())
    boundaries = np.cumsum([s["tokens"] for s in shards])  # a document counts where its EOT is
    eot_positions = np.flatnonzero(tokens == EOT)
    assert [s["documents"] for s in shards] == np.diff(np.searchsorted(eot_positions, boundaries), prepend=0).tolist()
    assert manifest["complete"] and manifest["settings"]["eot"] == "after each document"
    assert [f["path"] for f in manifest["settings"]["source"]["files"]] == sorted(str(p) for p in parquet_dir.iterdir())


def test_tokens_match_encode_ordinary(texts, tmp_path):
    prepare(FileSource([str(_write_jsonl(tmp_path / "a.jsonl", texts))]), tmp_path / "out", shard_size=10**6,
            val_tokens=0, workers=1, progress=False)
    tok = get_tokenizer()
    expected = [t for text in texts for t in (*tok.encode(text), EOT)]
    assert stream(tmp_path / "out").tolist() == expected


def _write_jsonl(path, texts, **extra):
    path.write_text("".join(json.dumps({"text": t, **extra}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_min_score_filters_and_max_tokens_is_an_exact_budget(parquet_dir, texts, tmp_path):
    source = FileSource([str(parquet_dir)])
    prepare(source, tmp_path / "all", min_score=3, shard_size=4000, val_tokens=0, workers=2, progress=False)
    kept = [t for i, t in enumerate(texts) if round(1.0 + (i % 4) + 0.2) >= 3]
    assert documents_of(stream(tmp_path / "all")) == kept
    manifest = prepare(source, tmp_path / "cut", min_score=3, max_tokens=9999, shard_size=4000, val_tokens=0,
                       workers=2, progress=False)
    assert [s["tokens"] for s in manifest["shards"]] == [4000, 4000, 1999] and manifest["complete"]
    assert stream(tmp_path / "cut").tolist() == stream(tmp_path / "all")[:9999].tolist()


def test_jsonl_txt_globs_and_directories(tmp_path, texts):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    _write_jsonl(src / "b.jsonl", texts[10:20], score=1)
    _write_jsonl(src / "sub" / "a.jsonl", texts[:10], score=2)
    prepare(FileSource([str(src / "sub"), str(src / "*.jsonl")]), tmp_path / "j", shard_size=10**6, workers=2,
            progress=False)
    assert documents_of(stream(tmp_path / "j")) == texts[:20]  # patterns in order, each pattern's files sorted

    (src / "t1.txt").write_text("First file.\n\nSecond paragraph.\n", encoding="utf-8")
    (src / "t2.txt").write_text("Second file.\n", encoding="utf-8")
    prepare(FileSource([str(src / "*.txt")]), tmp_path / "docs", shard_size=10**6, workers=1, progress=False)
    assert documents_of(stream(tmp_path / "docs")) == ["First file.\n\nSecond paragraph.\n", "Second file.\n"]
    prepare(FileSource([str(src / "*.txt")], txt_unit="paragraph"), tmp_path / "paras", shard_size=10**6,
            workers=1, progress=False)
    assert documents_of(stream(tmp_path / "paras")) == ["First file.", "Second paragraph.\n", "Second file.\n"]


def test_embedded_corpus_is_deterministic_and_needs_no_download(tmp_path):
    docs = embedded_documents()
    assert len(docs) > 500 and sum(map(len, docs)) > 5_000_000  # a few million tokens
    assert any("The \"assert\" statement" in d for d in docs) and any("def " in d for d in docs)
    assert EmbeddedSource().describe() == EmbeddedSource().describe()
    assert main(["prepare", "--embedded", "--out", str(tmp_path / "e"), "--max-tokens", "60K", "--shard-size", "20K",
                 "--val-tokens", "10K", "--no-progress"]) == 0
    tokens = stream(tmp_path / "e")
    assert len(tokens) == 60_000
    complete = documents_of(tokens[: np.flatnonzero(tokens == EOT)[-1] + 1])
    assert len(complete) >= 3 and complete == [d for d in docs if d][: len(complete)]
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert [(s["file"], s["tokens"]) for s in manifest["shards"]] == [
        ("embedded_val_000000.bin", 10_000), ("embedded_train_000001.bin", 20_000),
        ("embedded_train_000002.bin", 20_000), ("embedded_train_000003.bin", 10_000)]


def test_hub_dataset_path_via_a_local_dataset_repo(tmp_path, texts):
    """The --dataset code path (load_dataset(name, config, streaming=True)) on a hub-style local repo."""
    repo = tmp_path / "repo"
    (repo / "sample" / "10BT").mkdir(parents=True)
    pq.write_table(fineweb_table(texts[:50]), repo / "sample" / "10BT" / "000_00000.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: sample-10BT\n  data_files:\n  - split: train\n    path: sample/10BT/*\n---\n"
    )
    prepare(HubSource(str(repo), "sample-10BT"), tmp_path / "out", shard_size=10**6, workers=1, progress=False)
    assert documents_of(stream(tmp_path / "out")) == texts[:50]
    with pytest.raises(UserError, match="cannot open dataset .*nope.*--dataset/--dataset-config"):
        prepare(HubSource(str(repo), "nope"), tmp_path / "out2", workers=1, progress=False)


EMBEDDED_ARGS = ["--embedded", "--shard-size", "100K", "--val-tokens", "50K", "--max-tokens", "2500K", "--no-progress"]


def test_resume_after_sigkill_is_byte_identical(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert main(["prepare", *EMBEDDED_ARGS, "--out", str(clean), "--workers", "2"]) == 0
    command = [sys.executable, "-m", "gpt2forge.cli", "prepare", *EMBEDDED_ARGS, "--out", str(killed), "--workers", "1"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:
        try:
            if len(json.loads((killed / "manifest.json").read_text())["shards"]) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted = json.loads((killed / "manifest.json").read_text())
    assert not interrupted["complete"] and 3 <= len(interrupted["shards"]) < 26
    assert main(["prepare", *EMBEDDED_ARGS, "--out", str(killed), "--workers", "2"]) == 0
    assert files_of(killed) == files_of(clean)


def test_crash_mid_write_then_resume_and_a_rebuilt_corrupt_shard(tmp_path, parquet_dir, monkeypatch, capsys):
    def run(out, **options):
        return prepare(FileSource([str(parquet_dir)]), out, shard_size=1500, val_tokens=1000, workers=2,
                       progress=False, **options)

    run(tmp_path / "clean")
    real_write, calls = output_module.write_shard, []

    def failing_write(path, tokens):
        calls.append(path)
        if len(calls) == 4:  # die halfway through the 4th shard: a partial temporary file is left behind
            path.with_name(path.name + ".tmp").write_bytes(b"partial")
            raise OSError("disk on fire")
        return real_write(path, tokens)

    monkeypatch.setattr(output_module, "write_shard", failing_write)
    with pytest.raises(OSError, match="disk on fire"):
        run(tmp_path / "out")
    monkeypatch.setattr(output_module, "write_shard", real_write)
    assert len(json.loads((tmp_path / "out" / "manifest.json").read_text())["shards"]) == 3
    run(tmp_path / "out")
    assert files_of(tmp_path / "out") == files_of(tmp_path / "clean")

    # an unfinished run whose second shard got corrupted: rebuilt from that shard on, still identical
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    manifest["complete"] = False
    manifest["shards"] = manifest["shards"][:4]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    second = tmp_path / "out" / manifest["shards"][1]["file"]
    second.write_bytes(second.read_bytes()[:-2] + b"\x00\x00")
    capsys.readouterr()
    run(tmp_path / "out")
    assert "does not match the manifest: rebuilding" in capsys.readouterr().err
    assert files_of(tmp_path / "out") == files_of(tmp_path / "clean")


def test_other_settings_are_refused_and_a_complete_directory_is_left_alone(tmp_path, parquet_dir, capsys):
    out = tmp_path / "out"
    args = ["prepare", "--files", str(parquet_dir), "--out", str(out), "--shard-size", "5000", "--no-progress"]
    assert main(args) == 0
    before = files_of(out)
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().err and files_of(out) == before
    assert main([*args, "--shard-size", "6000", "--min-score", "3"]) == 2
    err = capsys.readouterr().err
    assert "--shard-size (was 5000, now 6000)" in err and "--min-score (was null, now 3.0)" in err
    assert "--overwrite" in err and files_of(out) == before
    assert main([*args, "--shard-size", "6000", "--overwrite"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["shard_size"] == 6000 and manifest["shards"][0]["tokens"] == 6000
    assert {p.name for p in out.iterdir()} == {s["file"] for s in manifest["shards"]} | {"manifest.json"}


def test_verify_reports_corrupted_truncated_and_unlisted_shards(tmp_path, parquet_dir, capsys):
    out = tmp_path / "out"
    prepare(FileSource([str(parquet_dir)]), out, shard_size=2000, prefix="fw", workers=2, progress=False)
    assert main(["prepare", "--verify", str(out)]) == 0
    assert "all" in capsys.readouterr().out
    names = [s["file"] for s in json.loads((out / "manifest.json").read_text())["shards"]]
    corrupt, truncated = out / names[1], out / names[2]
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 1
    corrupt.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-10])
    (out / "fw_train_000099.bin").write_bytes((out / names[3]).read_bytes())
    assert main(["prepare", "--verify", str(out)]) == 2
    captured = capsys.readouterr()
    lines = {line.split()[1].rstrip(":"): line for line in captured.out.splitlines()[1:]}
    assert lines[names[0]].split()[0] == "OK"
    assert "sha256 differs" in lines[names[1]] and "truncated" in lines[names[2]]
    assert "not listed in manifest.json" in lines["fw_train_000099.bin"]
    assert "3 problem(s)" in captured.err

    (out / "manifest.json").unlink()  # without a manifest: headers and sizes only
    (out / "fw_train_000100.bin").write_bytes(b"\0" * 2048)
    assert main(["prepare", "--verify", str(out)]) == 2
    captured = capsys.readouterr().out
    assert "headers and sizes only" in captured and "truncated" in captured and "sha256" not in captured
    assert "magic 0, expected 20240520" in captured and f"OK    {names[1]}" in captured


def test_bad_input_is_one_clear_message_naming_the_file(tmp_path, parquet_dir, capsys):
    def error(*args) -> str:
        assert main(["prepare", *args, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        return capsys.readouterr().err

    missing_file = str(tmp_path / "nope.parquet")
    assert f"file {missing_file} does not exist" in error("--files", missing_file)
    assert "matches no files" in error("--files", str(tmp_path / "*.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty.jsonl is empty" in error("--files", str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe not utf-8\n")
    assert "bad.txt is not valid UTF-8" in error("--files", str(tmp_path / "bad.txt"))
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert "bad.jsonl is not valid UTF-8 text (row 1" in error("--files", str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    assert "cannot read " + str(tmp_path / "broken.jsonl") in error("--files", str(tmp_path / "broken.jsonl"))
    missing = error("--files", str(parquet_dir), "--text-column", "content")
    assert "has no column 'content' (--text-column); its columns are: text, id, dump, url" in missing
    assert "000_00000.parquet" in missing
    assert "no column 'quality' (--score-column)" in error("--files", str(parquet_dir), "--min-score", "3",
                                                           "--score-column", "quality")
    _write_jsonl(tmp_path / "mix.jsonl", ["x"])
    assert "mixes formats (json, text)" in error("--files", str(tmp_path / "mix.jsonl"), str(tmp_path / "bad.txt"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing half-made


def test_settings_that_cannot_work_are_refused_before_anything_is_written(tmp_path, parquet_dir, monkeypatch):
    source = FileSource([str(parquet_dir)])
    with pytest.raises(UserError, match="--prefix 'a_val_b'"):
        prepare(source, tmp_path / "out", prefix="a_val_b", progress=False)

    class HugeVocab:
        n_vocab = 100_000

    monkeypatch.setattr(prepare_module, "get_tokenizer", lambda vocab_dir=None: HugeVocab())
    with pytest.raises(UserError, match="100,000 tokens does not fit uint16"):
        prepare(source, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").iterdir())


def test_cli_errors_leave_no_traceback_and_help_is_fast(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gpt2forge.cli", "prepare", "--files", str(tmp_path / "x.txt"),
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    check = "import sys, gpt2forge.commands as c; c.build_parser('prepare'); assert 'datasets' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check], check=False).returncode == 0


def test_shard_plan_splits_val_into_shards_then_train():
    settings = Settings(source={}, text_column="text", min_score=None, score_column=None, max_tokens=None,
                        shard_size=100, val_tokens=250, prefix="p", tokenizer={})
    assert [settings.shard_plan(i) for i in range(5)] == [("val", 100), ("val", 100), ("val", 50), ("train", 100),
                                                          ("train", 100)]
    no_val = Settings(**{**settings.__dict__, "val_tokens": 0})
    assert no_val.shard_plan(0) == ("train", 100)


def test_count_option_accepts_suffixes():
    from gpt2forge.commands import token_count

    assert [token_count(t) for t in ("1000", "100_000", "1e8", "250K", "100M", "10B")] == [
        1000, 100_000, 10**8, 250_000, 10**8, 10**10]
    with pytest.raises(argparse.ArgumentTypeError):
        token_count("lots")


@pytest.mark.parametrize("kind", ["jsonl no rows", "jsonl empty and null texts", "parquet no rows",
                                  "parquet empty and null texts", "parquet all filtered out"])
def test_an_input_without_documents_is_refused_naming_it(tmp_path, capsys, kind):
    """No rows at all, or only empty/null texts: one line naming the input, exit 2, and no empty dataset written."""
    if kind.startswith("jsonl"):
        path = tmp_path / "docs.jsonl"
        if kind == "jsonl no rows":
            path.write_text("\n")  # not 0 bytes (refused earlier as "is empty"), but no row
        else:
            path.write_text('{"text": ""}\n{"text": null}\n{"text": ""}\n')
    else:
        path = tmp_path / "docs.parquet"
        texts = {"parquet no rows": [], "parquet empty and null texts": ["", None, ""],
                 "parquet all filtered out": ["kept only with a score of 5 or more"]}[kind]
        pq.write_table(pa.table({"text": pa.array(texts, pa.string()), "int_score": pa.array([1] * len(texts))}), path)
    out = tmp_path / "out"
    extra = ["--min-score", "5"] if kind == "parquet all filtered out" else []
    code = main(["prepare", "--files", str(path), *extra, "--out", str(out), "--no-progress", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and f"{path} holds no documents" in err and "Traceback" not in err, err
    assert ("int_score ≥ 5 (--min-score)" in err) == bool(extra)
    assert not out.exists()  # nothing written: not even the directory this run created

    out.mkdir()  # an existing --out is left as it was
    assert main(["prepare", "--files", str(path), *extra, "--out", str(out), "--no-progress", "--workers", "1"]) == 2
    assert "holds no documents" in capsys.readouterr().err and list(out.iterdir()) == []
