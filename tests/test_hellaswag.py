import hashlib
import json
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import HELLASWAG_SAMPLE as SHARED  # 64 real validation rows, committed

from gpt2forge import dist
from gpt2forge.errors import UserError
from gpt2forge.eval import hellaswag
from gpt2forge.eval.hellaswag import evaluate_hellaswag, load_hellaswag
from gpt2forge.eval.scoring import fit_to_context, score_examples
from gpt2forge.tokenizer import get_tokenizer
from gpt2forge.weights import load_model


def real_lines(n: int) -> list[str]:
    with open(SHARED) as f:
        return [next(f) for _ in range(n)]


def reference_scores(hf_model, lines: list[str], block_size: int):
    """Each ending scored alone, unbatched and unpadded, by transformers: [(sum losses, mean losses, label)]."""
    tok = get_tokenizer()
    out = []
    for line in lines:
        row = json.loads(line)
        ctx = tok.encode(row["ctx"])
        endings = [tok.encode(" " + e) for e in row["endings"]]
        ctx = ctx[-(block_size + 1 - max(map(len, endings))) :]  # the model reads at most block_size tokens
        sums, means = [], []
        for ending in endings:
            ids = torch.tensor([ctx + ending])
            with torch.no_grad():
                logits = hf_model(ids[:, :-1]).logits[0]
            loss = F.cross_entropy(logits[len(ctx) - 1 :], ids[0, len(ctx) :], reduction="none")
            sums.append(loss.sum().item())
            means.append(loss.mean().item())
        out.append((sums, means, row["label"]))
    return out


def test_scores_match_transformers_scoring_one_example_at_a_time(hf_model_dir):
    import transformers
    n = 40
    data = load_hellaswag(SHARED, limit=n)
    ours = load_model(hf_model_dir)
    block = ours.config.block_size  # 64: several of these rows need their context truncated
    fitted, skipped, truncated = fit_to_context(data.examples, block)
    assert len(fitted) == n and not skipped and truncated > 0
    scores = score_examples(ours, fitted, device="cpu", batch_size=12)  # 3 examples a batch, last one padded
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_model_dir).eval()
    ref = reference_scores(hf, real_lines(n), block)
    ref_sums = torch.tensor([r[0] for r in ref])
    ref_means = torch.tensor([r[1] for r in ref])
    torch.testing.assert_close(-scores.logprob.view(n, 4), ref_sums, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(-scores.normalised("token").view(n, 4), ref_means, rtol=1e-5, atol=1e-5)
    assert scores.predictions().tolist() == ref_sums.argmin(1).tolist()
    assert scores.predictions("token").tolist() == ref_means.argmin(1).tolist()

    labels = torch.tensor([r[2] for r in ref])
    result = evaluate_hellaswag(ours, data, device="cpu", batch_size=8, progress=False)
    assert result["n"] == n and result["rows"] == n and result["skipped"] == 0
    assert result["truncated"] == truncated
    assert result["correct"] == int((ref_sums.argmin(1) == labels).sum())
    assert result["correct_norm"] == int((ref_means.argmin(1) == labels).sum())
    assert result["acc_norm"] == result["correct_norm"] / n and result["acc"] == result["correct"] / n
    assert result["seq_len"] == block


def compile_counter():
    """A torch.compile backend that runs the graph eagerly and records the input shapes of every compilation."""
    shapes = []

    def backend(gm, example_inputs):
        shapes.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    return backend, shapes


def test_compiled_model_compiles_once_and_scores_the_same(tiny_model):
    data = load_hellaswag(SHARED, limit=11)  # 11 examples, 2 a batch: the 6th batch is half padding
    eager = evaluate_hellaswag(tiny_model, data, device="cpu", batch_size=8, progress=False)
    torch._dynamo.reset()
    backend, shapes = compile_counter()
    compiled = torch.compile(tiny_model, backend=backend)
    for _ in range(2):  # as in training: evaluated again later, still no recompilation
        result = evaluate_hellaswag(compiled, data, device="cpu", batch_size=8, progress=False)
        assert result == eager
    assert len(shapes) == 1, shapes
    assert (8, 64) in shapes[0]
    torch._dynamo.reset()


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines))
    return path


def test_bad_rows_are_skipped_and_reported(tmp_path, tiny_model):
    good = real_lines(3)
    row = json.loads(good[0])
    lines = [
        good[0],
        "{not json",
        json.dumps({**row, "endings": row["endings"][:3]}),
        json.dumps({**row, "label": 7}),
        "",  # blank lines are not rows
        json.dumps({k: v for k, v in row.items() if k != "ctx"}),
        json.dumps([1, 2]),
        good[1],
        json.dumps({**row, "label": "2"}),  # a label stored as text is still usable
        json.dumps({**row, "endings": [*row["endings"][:3], ""]}),
        json.dumps({**row, "endings": [*row["endings"][:3], "word " * 80]}),  # the ending alone overflows 64
        good[2],
    ]
    data = load_hellaswag(write_lines(tmp_path / "bad.jsonl", lines))
    assert [ex.line for ex in data.examples] == [1, 8, 9, 11, 12]
    assert data.examples[2].label == 2
    reasons = {s.line: s.reason for s in data.skipped}
    assert set(reasons) == {2, 3, 4, 6, 7, 10}
    assert "not valid JSON" in reasons[2]
    assert "endings is not a list of 4" in reasons[3]
    assert "label 7" in reasons[4]
    assert "missing field(s) ctx" in reasons[6]
    assert "not a JSON object" in reasons[7]
    assert "ending is not a non-empty string" in reasons[10]
    assert data.rows == 11

    result = evaluate_hellaswag(tiny_model, data, device="cpu", batch_size=4, progress=False)
    assert result["n"] == 4 and result["skipped"] == 7
    assert [s["line"] for s in result["skipped_rows"]] == [2, 3, 4, 6, 7, 10, 11]
    assert "does not fit the context of 64" in result["skipped_rows"][-1]["reason"]


def test_a_file_without_usable_rows_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"no usable rows \(2 read: line 1: not valid JSON"):
        load_hellaswag(write_lines(tmp_path / "junk.jsonl", ["{", "[]"]))


def test_limit_keeps_the_first_rows(tiny_model):
    data = load_hellaswag(SHARED, limit=5)
    assert data.rows == 5 and [ex.line for ex in data.examples] == [1, 2, 3, 4, 5]
    assert data.sha256 == hashlib.sha256(SHARED.read_bytes()).hexdigest()  # of the whole file, not the 5 rows
    assert evaluate_hellaswag(tiny_model, data, device="cpu", batch_size=8, progress=False)["n"] == 5


def test_ranks_score_disjoint_shares_and_counts_are_summed(tiny_model, monkeypatch):
    data = load_hellaswag(SHARED, limit=7)
    whole = evaluate_hellaswag(tiny_model, data, device="cpu", batch_size=4, progress=False)
    reduced = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op="sum": reduced.append(t.clone()) or t)
    parts = [
        evaluate_hellaswag(tiny_model, data, device="cpu", batch_size=4, rank=r, world_size=3, progress=False)
        for r in range(3)
    ]
    assert [p["n"] for p in parts] == [3, 2, 2] and len(reduced) == 3
    summed = torch.stack(reduced).sum(0).tolist()
    assert summed == [whole["n"], whole["correct"], whole["correct_norm"]]


def test_download_is_cached_and_atomic(tmp_path, monkeypatch):
    calls, real_fetch = [], hellaswag._fetch

    def fake_fetch(url, dest):
        calls.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("{}\n")

    monkeypatch.setattr(hellaswag, "_fetch", fake_fetch)
    first = hellaswag.locate(cache_dir=tmp_path / "cache")
    assert first == tmp_path / "cache" / "hellaswag_val.jsonl" and first.is_file()
    assert hellaswag.locate(cache_dir=tmp_path / "cache") == first
    assert calls == [hellaswag.URL]  # the second call used the cache

    # the real downloader: a connection dropped mid-file leaves neither the file nor a temporary behind
    class Dropped:
        def __init__(self):
            self.chunks = [b'{"ctx": "half a ro']

        def read(self, n):
            if self.chunks:
                return self.chunks.pop()
            raise ConnectionResetError("connection reset")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Dropped())
    dest = tmp_path / "real" / "hellaswag_val.jsonl"
    with pytest.raises(ConnectionResetError):
        real_fetch(hellaswag.URL, dest)
    assert list(dest.parent.iterdir()) == []


def test_offline_without_a_local_file_says_to_pass_one(tmp_path, monkeypatch):
    def offline(url, dest):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(hellaswag, "_fetch", offline)
    with pytest.raises(UserError, match="Network is unreachable.*--hellaswag-file=PATH"):
        load_hellaswag(cache_dir=tmp_path)
    with pytest.raises(UserError, match=r"missing.jsonl \(--hellaswag-file\) does not exist"):
        load_hellaswag(tmp_path / "missing.jsonl")


def test_eval_cli_writes_hellaswag_results_next_to_the_checkpoint(tmp_path, tiny_model, capsys):
    from gpt2forge.cli import main
    from gpt2forge.weights import save_model

    checkpoint = tmp_path / "run" / "step-000042"
    checkpoint.mkdir(parents=True)
    save_model(tiny_model, checkpoint)
    (tmp_path / "run" / "latest").write_text("step-000042\n")
    args = ["eval", "--model", str(tmp_path / "run"), "--hellaswag-file", str(SHARED), "--hellaswag-limit", "6"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(step 42)" in out and "acc_norm" in out
    saved = json.loads((checkpoint / "eval.json").read_text())
    assert saved["step"] == 42 and saved["hellaswag"]["n"] == 6 and saved["hellaswag"]["rows"] == 6
    assert saved["hellaswag"]["sha256"] == hashlib.sha256(SHARED.read_bytes()).hexdigest()
    assert saved["versions"]["torch"] == torch.__version__
    assert main(["eval", "--model", str(checkpoint), "--hellaswag-limit", "3"]) == 2
    assert "--hellaswag-limit counts HellaSwag rows" in capsys.readouterr().err
