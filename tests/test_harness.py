"""lm-evaluation-harness on our checkpoints: our model class against lm-eval's own ``hf`` backend on the same
weights, over local task definitions (offline), for log-likelihoods, rolling log-likelihoods and generation."""

import json

import lm_eval  # in the dev extra: this test runs in CI, never skips
import pytest
import torch

from gpt2forge.commands import main
from gpt2forge.hf import export_hf
from gpt2forge.models.gpt2 import GPT, GPTConfig
from gpt2forge.weights import save_model

ROWS = [
    {"question": "Which animal says moo?", "choices": ["a cow", "a cat", "a duck"], "label": 0,
     "answer": "a cow", "text": "Cows are large grazing animals. They say moo and give milk to farmers every day."},
    {"question": "What colour is the clear daytime sky?", "choices": ["green", "blue"], "label": 1,
     "answer": "blue", "text": "On a clear day the sky looks blue because air scatters the short wavelengths of "
                               "sunlight far more than the long ones, and so the whole dome above us glows blue "
                               "from every direction, while the sun itself looks yellow-white and the horizon "
                               "is paler than the zenith."},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten", "four"], "label": 1,
     "answer": "eight", "text": "Spiders have eight legs."},
]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
KINDS = {
    "local_mc": """output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "local_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "local_gen": """output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture
def local_tasks(tmp_path, monkeypatch):
    """Three lm-eval task YAMLs over one local jsonl; lm-eval and datasets kept off the network."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name, body in KINDS.items():
        (folder / f"{name}.yaml").write_text(TASK.format(name=name, data=data) + body.format())
    return folder


def gpt2_pair(tmp_path):
    """A small random GPT-2 (biases randomised too) as our checkpoint and as its Hugging Face export."""
    torch.manual_seed(11)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_multiple=128)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_model(model, ckpt)
    return ckpt, export_hf(model, tmp_path / "hf")


def run(model, model_args, folder, tasks):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                   task_manager=TaskManager(include_path=str(folder)))


def per_doc(out, task):
    return [sample["resps"] for sample in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def test_our_class_and_lm_evals_hf_backend_agree_per_example_on_the_exported_gpt2(tmp_path, local_tasks):
    import gpt2forge.eval.harness  # noqa: F401 -- registers "gpt2forge" with lm-eval

    ckpt, hf_dir = gpt2_pair(tmp_path)
    tasks = list(KINDS)
    ours = run("gpt2forge", f"pretrained={ckpt},batch_size=4", local_tasks, tasks)
    theirs = run("hf", f"pretrained={hf_dir},device=cpu,batch_size=4,dtype=float32", local_tasks, tasks)
    mc_ours, mc_theirs = per_doc(ours, "local_mc"), per_doc(theirs, "local_mc")
    assert [len(d) for d in mc_ours] == [3, 2, 4]  # one request per choice
    for doc_ours, doc_theirs in zip(mc_ours, mc_theirs):
        for (a,), (b,) in zip(doc_ours, doc_theirs):
            assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]  # log-likelihood, greedy
    rolling_ours, rolling_theirs = per_doc(ours, "local_rolling"), per_doc(theirs, "local_rolling")
    assert [a[0][0] for a in rolling_ours] == pytest.approx([b[0][0] for b in rolling_theirs], abs=1e-3)
    assert per_doc(ours, "local_gen") == per_doc(theirs, "local_gen")  # greedy text, cut at the newline
    for task in tasks:
        assert ours["results"][task] == pytest.approx(theirs["results"][task], rel=1e-5, abs=1e-4), task


def test_eval_cli_runs_lm_eval_on_any_checkpoint(tmp_path, local_tasks, capsys):
    ckpt, _ = gpt2_pair(tmp_path)
    args = ["eval", "--model", str(ckpt), "--lm-eval", "local_mc,local_rolling", "--lm-eval-include",
            str(local_tasks), "--batch-size", "4", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "lm-eval    local_mc: acc " in out and "bits_per_byte" in out
    saved = json.loads((ckpt / "eval.json").read_text())["lm_eval"]
    assert set(saved["results"]) == {"local_mc", "local_rolling"}
    assert main(["eval", "--model", str(ckpt), "--lm-eval", "no_such_task_anywhere"]) == 2
    assert "--lm-eval no_such_task_anywhere" in capsys.readouterr().err
