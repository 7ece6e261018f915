"""``evaluate()``: validation loss and/or HellaSwag of a model, as a dict, a table, and a JSON file.

Where results go (``results_path``): ``eval.json`` in the checkpoint directory when the model is one of our
checkpoints (a run directory resolves through its ``latest`` pointer), or ``--out FILE``. Other models (Hugging
Face directories, hub names) get their results printed only unless ``--out`` is given: their directories may be
a shared hub cache that is not ours to write into.

Under ``torchrun`` every rank evaluates its share (val batches and HellaSwag examples are strided over ranks)
and rank 0 prints and writes; the process group is joined here through accelerate (``dist.join``), as training
joins it, when the launcher has not done so.
"""

from __future__ import annotations

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
        lines.append(f"val loss   {v['loss']:.4f}   ({v['tokens']:,} tokens, {v['batches']} batches of "
                     f"{v['batch_size']}×{v['seq_len']})")
    if "hellaswag" in results:
        h = results["hellaswag"]
        lines.append(f"hellaswag  acc_norm {h['acc_norm']:.4f} ({h['correct_norm']}/{h['n']})   "
                     f"acc {h['acc']:.4f} ({h['correct']}/{h['n']})")
        notes = [f"{h['skipped']} rows skipped"] if h["skipped"] else []
        notes += [f"{h['truncated']} contexts left-truncated"] if h["truncated"] else []
        if notes:
            shown = "; ".join(f"line {s['line']}: {s['reason']}" for s in h["skipped_rows"][:3])
            lines.append(f"           {', '.join(notes)}" + (f" (e.g. {shown})" if shown else ""))
    return "\n".join(lines)


def evaluate(
    model: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    val_tokens: int | None = None,
    hellaswag: bool = False,
    hellaswag_file: str | os.PathLike | None = None,
    hellaswag_limit: int | None = None,
    batch_size: int = 16,
    seq_len: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    vocab_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """Validation loss (``data``: a shard directory) and/or HellaSwag of ``model`` (checkpoint dir, run dir,
    Hugging Face dir or hub name). Under ``torchrun`` every rank scores its share; all ranks get the results.
    ``precision``: fp32, bf16 (autocast) or auto (bf16 on GPUs that compute it natively, fp32 elsewhere).
    ``progress``: bars over the batches on stderr (rank 0)."""
    import torch

    from .. import dist
    from ..device import autocast_dtype, device_name, hardware_summary, library_versions, resolve_device
    from ..weights import load_model, our_checkpoint
    from .hellaswag import evaluate_hellaswag, load_hellaswag

    hellaswag = hellaswag or hellaswag_file is not None
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if hellaswag_limit is not None and not hellaswag:
        raise UserError("--hellaswag-limit counts HellaSwag rows: add --hellaswag (for the validation loss use "
                        "--val-tokens)")
    if data is None and not hellaswag:
        raise UserError("nothing to evaluate: pass --data DIR (validation loss) and/or --hellaswag")
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
                                       world_size, progress)
        if hellaswag:
            from ..tokenizer import get_tokenizer

            rows = load_hellaswag(hellaswag_file, limit=hellaswag_limit, tokenizer=get_tokenizer(vocab_dir))
            results["hellaswag"] = evaluate_hellaswag(
                loaded, rows, device=device, batch_size=batch_size, autocast_dtype=autocast,
                rank=rank, world_size=world_size, progress=progress,
            )
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


def write_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {k: v for k, v in results.items() if k != "rank"})


def _val_loss(model, data, val_tokens, batch_size, seq_len, device: str, autocast, rank: int, world_size: int,
              progress: bool) -> dict:
    from ..data.loader import find_shards, val_batches
    from .loss import evaluate_loss

    seq_len = seq_len or model.config.block_size
    if seq_len > model.config.block_size:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {model.config.block_size} tokens")
    shards = find_shards(data, "val")
    batches = val_batches(data, batch_size, seq_len, rank=rank, world_size=world_size, max_tokens=val_tokens,
                          vocab_size=model.config.vocab_size)
    result = evaluate_loss(model, batches, device=device, autocast_dtype=autocast, world_size=world_size,
                           progress=progress and rank == 0)
    return {
        **result,
        "data": str(data),
        "shards": [p.name for p in shards],
        "batch_size": batch_size,
        "seq_len": seq_len,
        "max_tokens": val_tokens,
    }
