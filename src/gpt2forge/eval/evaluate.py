"""``evaluate()``: validation loss (nats/token, bits/byte), HellaSwag and/or the downstream suite (``tasks.py``) of
a model, as a dict, a table, and a JSON file.

Where results go (``results_path``): ``eval.json`` in the checkpoint directory when the model is one of our
checkpoints (a run directory resolves through its ``latest`` pointer), or ``--out FILE``. Other models (Hugging
Face directories, hub names) get their results printed only unless ``--out`` is given: their directories may be
a shared hub cache that is not ours to write into.

Under ``torchrun`` every rank evaluates its share (val batches and HellaSwag examples are strided over ranks)
and rank 0 prints and writes; the process group is joined here through accelerate (``dist.join``), as training
joins it, when the launcher has not done so.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write_json
from ..runs import training_position

PRECISIONS = ("fp32", "bf16", "auto")  # as train.precision: auto = bf16 on GPUs that compute it natively, else fp32


def format_table(results: dict) -> str:
    lines = [f"model      {results['model']}" + (f" (step {results['step']})" if results["step"] is not None else "")]
    if "val" in results:
        v = results["val"]
        lines.append(f"val loss   {v['loss']:.4f} nats/token   {v['bpb']:.4f} bits/byte   ({v['tokens']:,} tokens = "
                     f"{v['bytes']:,} bytes, {v['batches']} batches of {v['batch_size']}×{v['seq_len']})")
    if "hellaswag" in results:
        h = results["hellaswag"]
        lines.append(f"hellaswag  acc_norm {h['acc_norm']:.4f} ({h['correct_norm']}/{h['n']})   "
                     f"acc {h['acc']:.4f} ({h['correct']}/{h['n']})")
        notes = [f"{h['skipped']} rows skipped"] if h["skipped"] else []
        notes += [f"{h['truncated']} contexts left-truncated"] if h["truncated"] else []
        if notes:
            shown = "; ".join(f"line {s['line']}: {s['reason']}" for s in h["skipped_rows"][:3])
            lines.append(f"           {', '.join(notes)}" + (f" (e.g. {shown})" if shown else ""))
    if "tasks" in results:
        from .tasks import format_results

        lines += format_results(results["tasks"])
        for name, r in results["tasks"]["tasks"].items():
            if r["skipped"] or r["truncated"]:
                shown = "; ".join(f"row {s['row']}: {s['reason']}" for s in r["skipped_rows"][:3])
                lines.append(f"  {name}: {r['skipped']} rows skipped, {r['truncated']} contexts left-truncated"
                             + (f" (e.g. {shown})" if shown else ""))
    if "lm_eval" in results:
        for task, metrics in results["lm_eval"]["results"].items():
            shown = []
            for key, value in metrics.items():  # lm-eval's keys: "metric,filter"
                name, _, filtered = key.partition(",")
                if isinstance(value, float) and not name.endswith("_stderr"):
                    error = metrics.get(f"{name}_stderr,{filtered}")
                    shown.append(f"{name} {value:.4f}" + (f" ± {error:.4f}" if isinstance(error, float) else ""))
            lines.append(f"lm-eval    {task}: " + "   ".join(shown))
    return "\n".join(lines)


def evaluate(
    model: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    val_tokens: int | None = None,
    hellaswag: bool = False,
    hellaswag_file: str | os.PathLike | None = None,
    hellaswag_limit: int | None = None,
    tasks: str | list[str] | None = None,
    tasks_dir: str | os.PathLike | None = None,
    task_files: dict[str, str] | None = None,
    tasks_limit: int | None = None,
    lm_eval: str | None = None,
    lm_eval_include: str | None = None,
    lm_eval_limit: int | None = None,
    lm_eval_fewshot: int | None = None,
    batch_size: int = 16,
    seq_len: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    vocab_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """Validation loss (``data``: a shard directory), HellaSwag and/or the downstream ``tasks`` (names, or ``a,b``;
    data from ``task_files`` {task: path}, ``tasks_dir`` or the hub; ``tasks_limit`` rows each) of ``model``
    (checkpoint dir, run dir, Hugging Face dir or hub name). Under ``torchrun`` every rank scores its share; all
    ranks get the results.
    ``precision``: fp32, bf16 (autocast) or auto (bf16 on GPUs that compute it natively, fp32 elsewhere).
    ``progress``: bars over the batches on stderr (rank 0)."""
    import torch

    from .. import dist
    from ..device import autocast_dtype, device_name, hardware_summary, library_versions, resolve_device
    from ..weights import load_model, our_checkpoint
    from .hellaswag import evaluate_hellaswag, load_hellaswag
    from .tasks import evaluate_suite, load_task, parse_task_names

    hellaswag = hellaswag or hellaswag_file is not None
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if hellaswag_limit is not None and not hellaswag:
        raise UserError("--hellaswag-limit counts HellaSwag rows: add --hellaswag (for the validation loss use "
                        "--val-tokens)")
    task_names = parse_task_names(tasks) if tasks else []
    task_files = dict(task_files or {})
    if hellaswag_file is not None and "hellaswag" in task_names:
        task_files.setdefault("hellaswag", hellaswag_file)
    stray = sorted(set(task_files) - set(task_names))
    if stray:
        raise UserError(f"--task-file {stray[0]}=…: {stray[0]} is not among the --tasks being evaluated")
    if (tasks_dir is not None or tasks_limit is not None) and not task_names:
        raise UserError("--tasks-dir and --tasks-limit need --tasks (e.g. --tasks arc_easy,piqa or --tasks all)")
    if (lm_eval_include or lm_eval_limit or lm_eval_fewshot is not None) and not lm_eval:
        raise UserError("--lm-eval-include, --lm-eval-limit and --lm-eval-fewshot need --lm-eval TASKS")
    if data is None and not hellaswag and not task_names and not lm_eval:
        raise UserError("nothing to evaluate: pass --data DIR (validation loss), --hellaswag, --tasks LIST and/or "
                        "--lm-eval TASKS")
    if val_tokens is not None and data is None:
        raise UserError("--val-tokens needs --data DIR")
    device, created_group = dist.join(resolve_device(device, "--device"))
    rank, world_size = dist.rank(), dist.world_size()
    try:
        checkpoint = our_checkpoint(model)
        loaded = load_model(model, device)
        autocast = autocast_dtype(precision, device)
        step, tokens = training_position(checkpoint)
        results = {
            "model": str(model),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "step": step,
            "tokens_seen": tokens,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device),
            "precision": "bf16" if autocast == torch.bfloat16 else "fp32",
            "world_size": world_size,
            "versions": library_versions(), "hardware": hardware_summary(device),
        }
        if data is not None:
            results["val"] = _val_loss(loaded, data, val_tokens, batch_size, seq_len, device, autocast, rank,
                                       world_size, progress, vocab_dir)
        if hellaswag:
            from ..tokenizer import get_tokenizer

            rows = load_hellaswag(hellaswag_file, limit=hellaswag_limit, tokenizer=get_tokenizer(vocab_dir))
            results["hellaswag"] = evaluate_hellaswag(
                loaded, rows, device=device, batch_size=batch_size, autocast_dtype=autocast,
                rank=rank, world_size=world_size, progress=progress,
            )
        if task_names:
            from ..tokenizer import get_tokenizer

            suite = [load_task(name, file=task_files.get(name), tasks_dir=tasks_dir, limit=tasks_limit,
                               tokenizer=get_tokenizer(vocab_dir)) for name in task_names]
            results["tasks"] = evaluate_suite(loaded, suite, device=device, batch_size=batch_size,
                                              autocast_dtype=autocast, rank=rank, world_size=world_size,
                                              progress=progress)
        if lm_eval:
            if world_size > 1:
                raise UserError("--lm-eval runs in one process: start it without torchrun")
            from .harness import run_lm_eval

            out = run_lm_eval(model, lm_eval, include=lm_eval_include, limit=lm_eval_limit,
                              num_fewshot=lm_eval_fewshot, device=device, batch_size=batch_size,
                              precision=precision, vocab_dir=vocab_dir)
            results["lm_eval"] = {"tasks": lm_eval, "limit": lm_eval_limit, "results": out["results"],
                                  "n-shot": out.get("n-shot"), "versions": out.get("versions")}
        results["rank"] = rank
        return results
    finally:
        if created_group:
            dist.leave()


def results_path(results: dict, out: str | os.PathLike | None) -> Path | None:
    """Where results are saved: ``out``, else eval.json in our checkpoint directory, else nowhere (a Hugging
    Face directory may be a shared hub cache that is not ours to write into)."""
    if out is not None:
        return Path(out)
    return Path(results["checkpoint"]) / "eval.json" if results["checkpoint"] else None


RUN_KEYS = ("model", "checkpoint", "step", "tokens_seen", "timestamp", "device", "precision", "world_size",
            "versions", "hardware", "evaluated", "rank")  # about the evaluation run; every other key is a result


def write_results(results: dict, path: Path) -> list[str]:
    """Write ``results`` to ``path``, merged into the results already there for the same model: an eval of the
    val loss alone keeps an earlier HellaSwag score. ``evaluated`` says when, how and where each result was
    computed. Returns the names of the results kept from before."""
    current = {k: v for k, v in results.items() if k != "rank"}
    done = {k: {key: current.get(key) for key in ("timestamp", "device", "precision", "world_size")}
            for k in current if k not in RUN_KEYS}
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        earlier = None  # none yet, or unreadable: replaced
    same = isinstance(earlier, dict) and _same_model(earlier, current)
    kept = {k: v for k, v in earlier.items() if k not in RUN_KEYS and k not in done} if same else {}
    evaluated = {k: v for k, v in (earlier.get("evaluated") or {}).items() if k in kept} if same else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**current, **kept, "evaluated": {**evaluated, **done}})
    return sorted(kept)


def _same_model(earlier: dict, current: dict) -> bool:
    """Whether two results are of one model: the same checkpoint directory (however it was named: a run directory
    or its step directory, relative or absolute) at the same step, or the same Hugging Face model name."""
    if current["checkpoint"] is None or earlier.get("checkpoint") is None:
        return earlier.get("model") == current["model"] and earlier.get("checkpoint") == current["checkpoint"]
    return (Path(earlier["checkpoint"]).resolve() == Path(current["checkpoint"]).resolve()
            and earlier.get("step") == current["step"])


def _val_loss(model, data, val_tokens, batch_size, seq_len, device: str, autocast, rank: int, world_size: int,
              progress: bool, vocab_dir: str | None) -> dict:
    from ..data.loader import find_shards, val_batches
    from .bpb import token_byte_lengths
    from .loss import evaluate_loss

    seq_len = seq_len or model.config.block_size
    if seq_len > model.config.block_size:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {model.config.block_size} tokens")
    shards = find_shards(data, "val")
    batches = val_batches(data, batch_size, seq_len, rank=rank, world_size=world_size, max_tokens=val_tokens,
                          vocab_size=model.config.vocab_size)
    result = evaluate_loss(model, batches, device=device, autocast_dtype=autocast, world_size=world_size,
                           progress=progress and rank == 0, token_bytes=token_byte_lengths(vocab_dir))
    return {
        **result,
        "data": str(data),
        "shards": [p.name for p in shards],
        "batch_size": batch_size,
        "seq_len": seq_len,
        "max_tokens": val_tokens,
    }
