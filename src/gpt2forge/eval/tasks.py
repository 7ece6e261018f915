"""The downstream suite: twelve zero-shot tasks scored by the model's log-likelihoods, each as accuracy and as
centered accuracy ``(acc − chance) / (1 − chance)``, and their mean, a CORE-style score (nanochat, DCLM).

Each task reads its published data (the hub id, config and split lm-evaluation-harness reads, in that layout)
and turns a row into choices, each a (context, continuation) text pair, with lm-evaluation-harness's prompt
(``Question: …\\nAnswer:`` and so on; the exceptions are named in ``FORMATS``). Multiple-choice tasks count as
correct when the right choice has the highest log-likelihood per token (``acc_norm``: build-nanogpt's and CORE's
normalisation); the summed (``acc``) and per-character (``acc_char``: lm-evaluation-harness's ``acc_norm``)
accuracies are reported beside it. LAMBADA is a completion: correct when every token of the last word is the
model's greedy choice (``acc``), with its perplexity. Error bars are binomial standard errors, sqrt(p(1−p)/n).

Where the rows come from, first found wins: a file named for the task (``--task-file TASK=PATH``), the task in
``--tasks-dir`` (``DIR/TASK.jsonl|parquet|arrow``, or a folder ``DIR/TASK/`` whose files of the split are read:
those named after it, ``test-00000-of-00001.parquet``, ``validation.jsonl``, …, else all of them), then the hub
through ``datasets`` (downloaded once, cached by it). HellaSwag's remote copy is the file ``--hellaswag`` reads.
Evaluation data is for scoring only: nothing here trains or tunes on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from . import hellaswag
from .scoring import (
    Example,
    Skipped,
    distributed_default,
    fit_to_context,
    padded_length,
    score_share,
    sum_over_ranks,
)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
SPLITS = ("train", "validation", "test", "dev")


def _mc(context: str, choices: Sequence[str], label: int) -> tuple[list[tuple[str, str]], int]:
    """Choices that share ``context``, each continuation after a space."""
    return [(context, " " + str(c)) for c in choices], int(label)


def _lettered(row: dict, key: str) -> int:
    """The index of the row's answer key in its ``choices.label`` (ARC, OpenBookQA, CommonsenseQA)."""
    labels, answer = list(row["choices"]["label"]), str(row[key]).strip()
    if answer not in labels:
        raise ValueError(f"{key} {answer!r} is not one of the choice labels {labels}")
    return labels.index(answer)


def _arc(row):
    return _mc(f"Question: {row['question']}\nAnswer:", row["choices"]["text"], _lettered(row, "answerKey"))


def _piqa(row):
    return _mc(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], row["label"])


def _winogrande(row):
    """The blank filled by each option is the choice's context; the rest of the sentence, the same continuation
    for both, is what is scored ("partial evaluation", Trinh & Le 2018)."""
    sentence = row["sentence"]
    blank = sentence.index("_")
    rest = " " + sentence[blank + 1 :].strip()
    choices = [(sentence[:blank] + row["option1"], rest), (sentence[:blank] + row["option2"], rest)]
    return choices, int(row["answer"]) - 1


def _copa(row):
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    premise = row["premise"].strip()[:-1]  # the full stop gives way to the connector
    lower = [c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
    return _mc(f"{premise} {connector}", lower, row["label"])


def _commonsense_qa(row):
    return _mc(f"Question: {row['question'].strip()}\nAnswer:", row["choices"]["text"], _lettered(row, "answerKey"))


def _openbookqa(row):
    return _mc(row["question_stem"], row["choices"]["text"], _lettered(row, "answerKey"))


def _sciq(row):
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return _mc(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:", choices, 3)


def _siqa(row):
    return _mc(f"Q: {row['context']} {row['question']}\nA:", [row["answerA"], row["answerB"], row["answerC"]],
               int(row["label"]) - 1)


def _boolq(row):
    label = row["label"] if "label" in row else row["answer"]  # super_glue's 0/1, or google/boolq's bool
    return _mc(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(label))


def _lambada(row):
    context, word = row["text"].rsplit(" ", 1)
    return [(context, " " + word)], 0


@dataclass(frozen=True)
class Task:
    """A task: where its data is published, how a row becomes choices, and how it is scored."""

    name: str
    hub: str
    config: str | None
    split: str
    choices: Callable[[dict], tuple[list[tuple[str, str]], int]]
    completion: bool = False  # scored by greedy match of its one continuation, not by comparing choices
    remote: Callable[[], Path] | None = None  # a download of its own instead of the hub (HellaSwag's file)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("hellaswag", "Rowan/hellaswag", None, "validation", hellaswag.row_choices, remote=hellaswag.locate),
    Task("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", _arc),
    Task("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", _arc),
    Task("piqa", "baber/piqa", None, "validation", _piqa),
    Task("winogrande", "allenai/winogrande", "winogrande_xl", "validation", _winogrande),
    Task("copa", "aps/super_glue", "copa", "validation", _copa),
    Task("commonsense_qa", "tau/commonsense_qa", None, "validation", _commonsense_qa),
    Task("openbookqa", "allenai/openbookqa", "main", "test", _openbookqa),
    Task("sciq", "allenai/sciq", None, "test", _sciq),
    Task("siqa", "lighteval/siqa", None, "validation", _siqa),
    Task("boolq", "aps/super_glue", "boolq", "validation", _boolq),
    Task("lambada", "EleutherAI/lambada_openai", "default", "test", _lambada, completion=True),
)}
FORMATS = {  # where a task's prompt is not lm-evaluation-harness's
    "hellaswag": "build-nanogpt's: the raw ctx and ' ' + ending, no bracket cleanup or activity label",
    "commonsense_qa": "cloze (the answer's text after 'Answer:'), not lm-eval's lettered A-E list",
    "copa": "one space before the choice (lm-eval's target delimiter adds a second one)",
}


def parse_task_names(text: str | Sequence[str], flag: str = "--tasks") -> list[str]:
    """Task names from ``a,b,c`` (or a list), ``all`` for every task; unknown names are a UserError."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise UserError(f"{flag}: unknown task(s) {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(TASKS)} (or all)")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------- the rows


def read_rows(path: Path) -> list[dict]:
    """The rows of a jsonl (or JSON list), parquet or Arrow (IPC stream or file) table."""
    if path.suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    rows.append({"__error__": f"line {number}: not valid JSON ({e.msg})"})
        return rows
    import pyarrow as pa

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    try:
        with pa.ipc.open_stream(path) as reader:  # what datasets writes
            return reader.read_all().to_pylist()
    except pa.ArrowInvalid:
        with pa.ipc.open_file(path) as reader:
            return reader.read_all().to_pylist()


def local_files(task: Task, tasks_dir: Path) -> list[Path]:
    """The task's files under ``tasks_dir`` (see the module docstring), or none."""
    for suffix in DATA_SUFFIXES:
        if (tasks_dir / f"{task.name}{suffix}").is_file():
            return [tasks_dir / f"{task.name}{suffix}"]
    folder = tasks_dir / task.name
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
    of_split = [p for p in files if p.name.startswith(task.split)]
    return of_split or [p for p in files if not p.name.startswith(SPLITS)]


def _hub_rows(task: Task) -> list[dict]:
    import datasets

    return list(datasets.load_dataset(task.hub, task.config, split=task.split))


def _sha256(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass
class TaskData:
    """A task's examples, its unusable rows, and where they came from."""

    task: Task
    source: str
    sha256: str | None
    rows: int
    examples: list[Example]
    skipped: list[Skipped] = field(default_factory=list)


def find_rows(task: Task, file: str | os.PathLike | None = None, tasks_dir: str | os.PathLike | None = None,
              offline_hint: str | None = None) -> tuple[list[dict], str, str | None]:
    """(rows, where they came from, sha256 of the local files or None for the hub's). ``offline_hint``: how to
    point at local data, for the error (default: the eval command's flags)."""
    name = task.name
    flags = offline_hint or f"--task-file {name}=PATH or --tasks-dir DIR (holding {name}/ or {name}.jsonl)"
    if file is not None:
        path = Path(file).expanduser()
        if not path.is_file():
            raise UserError(f"task {task.name}: file {path} (--task-file {task.name}=…) does not exist")
        paths = [path]
    else:
        paths = local_files(task, Path(tasks_dir).expanduser()) if tasks_dir else []
    if not paths and task.remote is not None:
        try:
            paths = [task.remote()]
        except UserError as e:
            raise UserError(f"task {task.name}: {e}; or pass {flags}") from None
    if paths:
        rows = []
        for path in paths:
            try:
                rows += read_rows(path)
            except Exception as e:  # a truncated parquet, bad UTF-8, a wrong Arrow file: the same message
                raise UserError(f"task {task.name}: cannot read {path} ({type(e).__name__}: {e})") from None
        return rows, ", ".join(map(str, paths)), _sha256(paths)
    try:
        rows = _hub_rows(task)
    except Exception as e:  # offline, unknown id, auth: all end the same way for the user
        detail = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"task {task.name}: no local data and the hub dataset {task.hub} could not be loaded "
                        f"({type(e).__name__}: {detail}); offline, pass {flags}") from None
    return rows, f"hub {task.hub}" + (f" ({task.config})" if task.config else "") + f" split {task.split}", None


def load_task(name: str, *, file=None, tasks_dir=None, limit: int | None = None, tokenizer=None,
              offline_hint: str | None = None) -> TaskData:
    """Read and tokenize a task's rows (the first ``limit``); unusable rows are skipped with a reason."""
    if tokenizer is None:
        from ..tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    task = TASKS[name]
    rows, source, sha256 = find_rows(task, file, tasks_dir, offline_hint)
    rows = rows[:limit] if limit else rows
    examples, skipped = [], []
    for number, row in enumerate(rows, start=1):
        try:
            if "__error__" in row:
                raise ValueError(row["__error__"])
            choices, label = task.choices(row)
            if not 0 <= label < len(choices):
                raise ValueError(f"label {label} is not one of the {len(choices)} choices")
            if not all(isinstance(c, str) and isinstance(t, str) and t.strip() for c, t in choices):
                raise ValueError("a choice is not a non-empty string")
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            reason = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            skipped.append(Skipped(number, reason))
            continue
        examples.append(hellaswag.tokenize_choices(choices, label, number, tokenizer))
    if not examples:
        reasons = "; ".join(f"row {s.line}: {s.reason}" for s in skipped[:3])
        raise UserError(f"task {name}: {source} has no usable rows ({len(rows)} read"
                        f"{': ' + reasons if reasons else ''})")
    return TaskData(task, source, sha256, len(rows), examples, skipped)


# ------------------------------------------------------------------------------------------- scoring


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def suite_length(suite: Sequence[TaskData], block_size: int) -> int:
    """One input length for every task of a suite (a compiled model then compiles once for all of them)."""
    return max(padded_length(fit_to_context(d.examples, block_size)[0] or d.examples, block_size) for d in suite)


def evaluate_task(model, data: TaskData, *, device, batch_size: int = 32, autocast_dtype=None,
                  block_size: int | None = None, seq_len: int | None = None, rank: int | None = None,
                  world_size: int | None = None, progress: bool = False) -> dict:
    """One task's accuracies (with standard errors), chance level and centered accuracy, over all ranks.

    ``seq_len`` (default: the task's own padded length) fixes the input shape; each rank scores every
    ``world_size``-th example and the counts are summed."""
    rank, world_size = distributed_default(rank, world_size)
    block_size = block_size or model.config.block_size
    examples, too_long, truncated = fit_to_context(data.examples, block_size)
    skipped = sorted(data.skipped + too_long, key=lambda s: s.line)
    name = data.task.name
    if not examples:
        raise UserError(f"task {name}: no example fits the model's context of {block_size} tokens")
    seq_len = min(seq_len or padded_length(examples, block_size), block_size)
    mine, scores = score_share(model, examples, device=device, batch_size=batch_size, seq_len=seq_len, rank=rank,
                               world_size=world_size, autocast_dtype=autocast_dtype, progress=progress and rank == 0,
                               desc=name)
    labels = torch.tensor([ex.label for ex in mine], dtype=torch.long)
    right = [float((scores.predictions(norm) == labels).sum()) for norm in ("none", "token", "char")]
    greedy = float(sum(bool(g[0]) for g in scores.per_example(scores.greedy)))
    chance = sum(1 / len(ex.choices) for ex in mine) if not data.task.completion else 0.0
    logprob = float(scores.logprob.double().sum())
    n, correct, correct_norm, correct_char, greedy, chance, logprob = sum_over_ranks(
        [len(mine), *right, greedy, chance, logprob], device, world_size)
    n = int(n)
    result = {"task": name, "n": n}
    if data.task.completion:
        result.update(metric="acc", acc=greedy / n, perplexity=math.exp(-logprob / n))
    else:
        for key, count in (("acc", correct), ("acc_norm", correct_norm), ("acc_char", correct_char)):
            result[key], result[f"{key}_stderr"] = count / n, _stderr(count / n, n)
        result["metric"] = "acc_norm"
    accuracy = result[result["metric"]]
    chance /= n
    result.update(
        accuracy=accuracy, accuracy_stderr=_stderr(accuracy, n), chance=chance,
        centered=(accuracy - chance) / (1 - chance), centered_stderr=_stderr(accuracy, n) / (1 - chance),
        truncated=truncated, skipped=len(skipped),
        skipped_rows=[{"row": s.line, "reason": s.reason} for s in skipped[: hellaswag.SKIPPED_SHOWN]],
        rows=data.rows, source=data.source, sha256=data.sha256, split=data.task.split, seq_len=seq_len,
    )
    if name in FORMATS:
        result["format"] = FORMATS[name]
    return result


def core_score(results: dict[str, dict]) -> dict:
    """The mean centered accuracy of the tasks (CORE-style) with its standard error (tasks independent)."""
    centered = [r["centered"] for r in results.values()]
    errors = [r["centered_stderr"] for r in results.values()]
    return {"core": sum(centered) / len(centered),
            "core_stderr": math.sqrt(sum(e * e for e in errors)) / len(errors)}


def evaluate_suite(model, suite: Sequence[TaskData], *, one_length: bool = False, **kwargs) -> dict:
    """``{"tasks": {name: result}, "core": ...}`` for a suite; ``one_length`` scores every task at the suite's
    longest input (one compilation for all of them, as the training loop wants)."""
    if one_length:
        block_size = kwargs.get("block_size") or model.config.block_size
        kwargs["seq_len"] = suite_length(suite, block_size)
    results = {d.task.name: evaluate_task(model, d, **kwargs) for d in suite}
    return {"tasks": results, **core_score(results)}


def format_results(suite: dict) -> list[str]:
    """Table lines: each task's accuracy, chance and centered accuracy with error bars, then the mean."""
    lines = [f"{'task':<15} {'metric':<9} {'accuracy':>16} {'chance':>7} {'centered':>17}      n"]
    for name, r in suite["tasks"].items():
        lines.append(f"{name:<15} {r['metric']:<9} {r['accuracy']:>8.4f} ± {r['accuracy_stderr']:.4f} "
                     f"{r['chance']:>7.3f} {r['centered']:>+9.4f} ± {r['centered_stderr']:.4f} {r['n']:>6}")
    lines.append(f"{'CORE-style mean of centered accuracies':<50} {suite['core']:>+9.4f} ± {suite['core_stderr']:.4f}"
                 f" ({len(suite['tasks'])} tasks)")
    return lines
