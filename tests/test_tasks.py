"""The downstream suite: task formats over local slices in the published layouts, the shared scoring engine
against transformers, centered accuracy and its mean, data location and its errors, the CLI and the loop."""

import csv
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import HELLASWAG_SAMPLE

from gpt2forge import dist
from gpt2forge.commands import main
from gpt2forge.errors import UserError
from gpt2forge.eval import tasks
from gpt2forge.eval.scoring import fit_to_context, score_examples
from gpt2forge.eval.tasks import TASKS, core_score, evaluate_suite, evaluate_task, load_task, parse_task_names
from gpt2forge.tokenizer import get_tokenizer
from gpt2forge.weights import load_model

SLICES = Path(__file__).parent / "data" / "tasks"


def raw_rows(task):
    """The slice's rows, read without the suite's code."""
    path = next(p for p in sorted((SLICES / task).iterdir()) if not p.name.startswith("train"))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    with pa.ipc.open_stream(path) as reader:
        return reader.read_all().to_pylist()


# Each task's choices written out here, independently of tasks.py: (contexts, continuations, label) per row.
def arc_easy(row):
    keys = row["choices"]["label"]
    return ([f"Question: {row['question']}\nAnswer:"] * len(keys), [" " + t for t in row["choices"]["text"]],
            keys.index(row["answerKey"]))


def winogrande(row):
    before, after = row["sentence"].split("_")
    return [before + row["option1"], before + row["option2"]], [" " + after.strip()] * 2, int(row["answer"]) - 1


def copa(row):
    joint = {"cause": " because", "effect": " therefore"}[row["question"]]
    conts = [" " + c[:1].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
    return [row["premise"].rstrip(".") + joint] * 2, conts, row["label"]


def lambada(row):
    words = row["text"].split(" ")
    return [" ".join(words[:-1])], [" " + words[-1]], 0


INDEPENDENT = {"arc_easy": arc_easy, "winogrande": winogrande, "copa": copa, "lambada": lambada}


def transformers_loglikelihoods(hf, tok, contexts, continuations, block_size):
    """Per choice, unbatched and unpadded: (summed log-prob, tokens, chars, greedy) of the continuation."""
    encoded = [(tok.encode(c), tok.encode(t)) for c, t in zip(contexts, continuations)]
    room = block_size + 1 - max(len(t) for _, t in encoded)
    out = []
    for (ctx, cont), text in zip(encoded, continuations):
        ids = torch.tensor([ctx[-room:] + cont])
        with torch.no_grad():
            logits = hf(ids[:, :-1]).logits[0, -len(cont):]
        logprobs = F.log_softmax(logits.double(), dim=-1)
        target = ids[0, -len(cont):]
        out.append((logprobs[range(len(cont)), target].sum().item(), len(cont), len(text.lstrip(" ")),
                    bool((logits.argmax(-1) == target).all())))
    return out


def test_random_transformers_gpt2_scored_by_the_suite_matches_an_independent_computation(hf_model_dir):
    """The issue's check: a random-weight GPT2LMHeadModel; our per-example choices equal those picked from
    transformers' own log-likelihoods, on four tasks (three multiple-choice layouts and a completion)."""
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_model_dir).eval()
    ours = load_model(hf_model_dir)
    tok, block = get_tokenizer(), ours.config.block_size
    for name, layout in INDEPENDENT.items():
        data = load_task(name, tasks_dir=SLICES)
        fitted, skipped, _ = fit_to_context(data.examples, block)
        assert not skipped and len(fitted) == len(raw_rows(name))
        scores = score_examples(ours, fitted, device="cpu", batch_size=3)  # batches cut across examples
        expected = {"none": [], "token": [], "char": []}
        logprobs, greedy, labels = [], [], []
        for row in raw_rows(name):
            contexts, continuations, label = layout(row)
            ll = transformers_loglikelihoods(hf, tok, contexts, continuations, block)
            logprobs += [s for s, _, _, _ in ll]
            greedy.append(ll[0][3])
            labels.append(label)
            for norm, div in (("none", lambda n, c: 1), ("token", lambda n, c: n), ("char", lambda n, c: c)):
                values = [s / div(n, c) for s, n, c, _ in ll]
                expected[norm].append(values.index(max(values)))
        torch.testing.assert_close(scores.logprob.double(), torch.tensor(logprobs, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-4)
        result = evaluate_task(ours, data, device="cpu", batch_size=4)
        if name == "lambada":
            assert [bool(g) for g in scores.greedy] == greedy
            assert result["acc"] == sum(greedy) / len(greedy) and result["chance"] == 0
            continue
        for norm, picks in expected.items():
            assert scores.predictions(norm).tolist() == picks, (name, norm)
        n = len(labels)
        correct = {norm: sum(p == y for p, y in zip(picks, labels)) for norm, picks in expected.items()}
        assert result["acc"] == correct["none"] / n and result["acc_norm"] == correct["token"] / n
        assert result["acc_char"] == correct["char"] / n and result["n"] == n
        chance = sum(1 / len(layout(r)[0]) for r in raw_rows(name)) / n
        assert result["chance"] == pytest.approx(chance)
        assert result["centered"] == pytest.approx((result["acc_norm"] - chance) / (1 - chance))


def test_every_task_reads_its_published_layout(tiny_model):
    """Twelve tasks from parquet (nested choices), jsonl and Arrow files; the train split beside a test split is
    not read."""
    assert len(TASKS) == 12
    for name in TASKS:
        data = (load_task(name, file=HELLASWAG_SAMPLE, limit=5) if name == "hellaswag"
                else load_task(name, tasks_dir=SLICES))
        assert not data.skipped and data.examples, name
        assert all(0 <= ex.label < len(ex.choices) for ex in data.examples)
    arc = load_task("arc_easy", tasks_dir=SLICES)
    assert arc.source.endswith("test-00000-of-00001.parquet") and arc.rows == 4  # not train-00000-of-00001
    assert [len(ex.choices) for ex in arc.examples] == [4, 4, 3, 4] and arc.examples[3].label == 0  # keys 1-4
    wino = load_task("winogrande", tasks_dir=SLICES).examples[0]
    assert wino.choices[0][1] == wino.choices[1][1] and wino.choices[0][0] != wino.choices[1][0]
    suite = evaluate_suite(tiny_model, [load_task(n, tasks_dir=SLICES) for n in ("piqa", "copa", "lambada")],
                           device="cpu", batch_size=4)
    assert suite["tasks"]["lambada"]["metric"] == "acc" and suite["tasks"]["piqa"]["chance"] == 0.5
    assert suite["core"] == pytest.approx(sum(r["centered"] for r in suite["tasks"].values()) / 3)


def test_centered_accuracy_error_bars_and_core():
    results = {"a": {"centered": 0.2, "centered_stderr": 0.03}, "b": {"centered": -0.1, "centered_stderr": 0.04}}
    assert core_score(results) == pytest.approx({"core": 0.05, "core_stderr": 0.025})


def test_ranks_score_disjoint_shares_and_counts_are_summed(tiny_model, monkeypatch):
    data = load_task("arc_easy", tasks_dir=SLICES)
    whole = evaluate_task(tiny_model, data, device="cpu", batch_size=4)
    reduced = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op="sum": reduced.append(t.clone()) or t)
    for rank in range(2):
        evaluate_task(tiny_model, data, device="cpu", batch_size=4, rank=rank, world_size=2)
    n, acc, acc_norm, acc_char, _, chance, logprob = torch.stack(reduced).sum(0).tolist()
    assert n == whole["n"] == 4 and acc / n == whole["acc"] and acc_norm / n == whole["acc_norm"]
    assert acc_char / n == whole["acc_char"] and chance / n == pytest.approx(whole["chance"])


def test_unusable_rows_are_skipped_with_a_reason(tmp_path, tiny_model):
    rows = raw_rows("piqa")
    bad = [rows[0], {"goal": "no solutions"}, {**rows[1], "label": 5}, {**rows[2], "sol2": ""}, rows[1]]
    path = tmp_path / "piqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in bad) + "{broken\n")
    data = load_task("piqa", tasks_dir=tmp_path)
    assert [ex.line for ex in data.examples] == [1, 5]
    reasons = {s.line: s.reason for s in data.skipped}
    assert "missing field 'sol1'" in reasons[2] and "label 5 is not one of the 2 choices" in reasons[3]
    assert "not a non-empty string" in reasons[4] and "not valid JSON" in reasons[6]
    result = evaluate_task(tiny_model, data, device="cpu")
    assert result["n"] == 2 and result["skipped"] == 4 and result["rows"] == 6


def test_no_local_data_and_no_hub_is_one_line_naming_the_task_and_the_flags(tmp_path, monkeypatch, capsys):
    def offline(task):
        raise ConnectionError("Couldn't reach 'allenai/sciq' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(tasks, "_hub_rows", offline)
    with pytest.raises(UserError, match=r"task sciq: no local data and the hub dataset allenai/sciq could not be "
                                        r"loaded \(ConnectionError: .*\); offline, pass --task-file sciq=PATH or "
                                        r"--tasks-dir DIR"):
        load_task("sciq", tasks_dir=tmp_path)
    with pytest.raises(UserError, match=r"task boolq: file .*missing.parquet \(--task-file boolq=…\) does not exist"):
        load_task("boolq", file=tmp_path / "missing.parquet")
    with pytest.raises(UserError, match="unknown task.*hellaswag, arc_easy"):
        parse_task_names("arc_easy,mmlu")
    assert parse_task_names("all") == list(TASKS)
    assert main(["eval", "--model", "gpt2", "--tasks", "piqa", "--task-file", "sciq=x.jsonl"]) == 2
    assert "sciq is not among the --tasks" in capsys.readouterr().err


def test_eval_cli_runs_the_suite_and_saves_it(tmp_path, tiny_model, capsys):
    from gpt2forge.weights import save_model

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_model(tiny_model, ckpt)
    args = ["eval", "--model", str(ckpt), "--tasks", "all", "--tasks-dir", str(SLICES), "--task-file",
            f"hellaswag={HELLASWAG_SAMPLE}", "--tasks-limit", "3", "--batch-size", "8", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    saved = json.loads((ckpt / "eval.json").read_text())["tasks"]
    assert set(saved["tasks"]) == set(TASKS) and all(r["n"] == 3 for r in saved["tasks"].values())
    assert f"{saved['core']:+.4f} ± {saved['core_stderr']:.4f} (12 tasks)" in out
    hs = saved["tasks"]["hellaswag"]
    assert hs["source"] == str(HELLASWAG_SAMPLE) and "format" in hs and hs["rows"] == 3
    for r in saved["tasks"].values():
        assert r["accuracy_stderr"] == pytest.approx(math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / r["n"]))


def test_training_loop_scores_the_suite_into_metrics_and_checkpoints(data_dir, tmp_path):
    from test_train import config

    from gpt2forge.train.trainer import train

    cfg = config(data_dir, tmp_path, **{
        "model.vocab_size": 50257, "model.vocab_multiple": 128, "train.max_steps": 2, "eval.val_every": 2,
        "eval.tasks_every": 2, "eval.tasks": "arc_easy,winogrande,lambada", "eval.tasks_dir": str(SLICES),
        "checkpoint.every": 0,
    })
    result = train(cfg)
    rows = [r for r in csv.DictReader(open(result.run_dir / "metrics.csv")) if r["core"]]
    assert [r["step"] for r in rows] == ["0", "2"] and all(r["val_bpb"] for r in rows)
    saved = json.loads((result.run_dir / "step-000002" / "training_eval.json").read_text())
    assert {"core", "arc_easy_acc", "winogrande_acc", "lambada_acc", "val_bpb"} <= set(saved)
    assert float(rows[-1]["core"]) == pytest.approx(saved["core"])
