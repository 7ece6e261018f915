"""``gpt2forge eval``: validation loss, HellaSwag, the downstream suite and/or lm-evaluation-harness tasks of a
model, as a table and JSON (``eval/evaluate.py``, ``eval/tasks.py``, ``eval/harness.py``)."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..eval.evaluate import PRECISIONS, evaluate, format_table, results_path, write_results
from . import MODEL_HELP, VOCAB_HELP, positive_int, token_count


def task_file(text: str) -> tuple[str, str]:
    """An argparse type: TASK=PATH."""
    task, sep, path = text.partition("=")
    if not sep or not task or not path:
        raise argparse.ArgumentTypeError(f"expected TASK=PATH, got {text!r}")
    return task.strip(), path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--data", metavar="DIR",
                        help="token shard directory: the validation loss uses its *_val_*.bin shards")
    parser.add_argument("--val-tokens", type=token_count,
                        help="evaluate at most this many val tokens, e.g. 10M or 1e7 (default: all)")
    parser.add_argument("--hellaswag", action="store_true",
                        help="score HellaSwag (downloaded once into ~/.cache/gpt2forge)")
    parser.add_argument("--hellaswag-file", help="local hellaswag_val.jsonl (for offline use; implies --hellaswag)")
    parser.add_argument("--hellaswag-limit", type=positive_int, metavar="N",
                        help="score only the first N HellaSwag rows (as eval.hellaswag_limit in a recipe)")
    parser.add_argument("--limit", dest="hellaswag_limit", type=positive_int, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)  # old spelling
    parser.add_argument("--tasks", metavar="LIST",
                        help="downstream tasks, comma-separated, or all: hellaswag, arc_easy, arc_challenge, piqa, "
                             "winogrande, copa, commonsense_qa, openbookqa, sciq, siqa, boolq, lambada (accuracy, "
                             "centered accuracy, their CORE-style mean; data from the hub, cached, unless local)")
    parser.add_argument("--tasks-dir", metavar="DIR",
                        help="local task data, offline: DIR/TASK.jsonl|parquet|arrow or DIR/TASK/ with the split's "
                             "files in the hub's layout")
    parser.add_argument("--task-file", metavar="TASK=PATH", type=task_file, action="append", default=[],
                        help="one task's local data file (repeatable); --hellaswag-file serves the hellaswag task")
    parser.add_argument("--tasks-limit", type=positive_int, metavar="N",
                        help="score only the first N rows of each task")
    parser.add_argument("--lm-eval", metavar="TASKS",
                        help="lm-evaluation-harness tasks, comma-separated (e.g. arc_easy,lambada_openai), on this "
                             "model as it is (any architecture; pip install 'gpt2forge[lm-eval]')")
    parser.add_argument("--lm-eval-include", metavar="DIR", help="folder of extra lm-eval task YAMLs (local tasks)")
    parser.add_argument("--lm-eval-limit", type=positive_int, metavar="N", help="lm-eval: first N documents per task")
    parser.add_argument("--lm-eval-fewshot", type=int, metavar="K", help="lm-eval: few-shot examples (default: the "
                                                                         "task's)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward pass (default 16)")
    parser.add_argument("--seq-len", type=positive_int, help="val sequence length (default: the model's context)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, …")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="compute precision, as train.precision: fp32 (default: the reference numbers' "
                             "precision), bf16 autocast, or auto (bf16 on GPUs that compute it natively)")
    parser.add_argument("--dtype", dest="precision", choices=PRECISIONS, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)  # old spelling
    parser.add_argument("--out", metavar="FILE",
                        help="JSON results file (default: eval.json in our checkpoint dir; else print only)")
    parser.add_argument("--vocab-dir", help=VOCAB_HELP)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr)")


def run(args: argparse.Namespace) -> dict:
    results = evaluate(
        args.model, data=args.data, val_tokens=args.val_tokens, hellaswag=args.hellaswag,
        hellaswag_file=args.hellaswag_file, hellaswag_limit=args.hellaswag_limit, tasks=args.tasks,
        tasks_dir=args.tasks_dir, task_files=_task_files(args.task_file), tasks_limit=args.tasks_limit,
        lm_eval=args.lm_eval, lm_eval_include=args.lm_eval_include, lm_eval_limit=args.lm_eval_limit,
        lm_eval_fewshot=args.lm_eval_fewshot,
        batch_size=args.batch_size,
        seq_len=args.seq_len, device=args.device, precision=args.precision, vocab_dir=args.vocab_dir,
        progress=not args.no_progress,
    )
    if results["rank"] == 0:
        print(format_table(results))
        out = results_path(results, args.out)
        if out is not None:
            kept = write_results(results, out)
            print(f"results written to {out}" + (f" (kept from an earlier eval: {', '.join(kept)})" if kept else ""))
        else:
            print("(not a gpt2forge checkpoint: results not saved; pass --out FILE to save them)")
    return results


def _task_files(pairs: list[tuple[str, str]]) -> dict[str, str]:
    files = {}
    for task, path in pairs:
        if task in files:
            raise UserError(f"--task-file {task}=… is given twice")
        files[task] = path
    return files
