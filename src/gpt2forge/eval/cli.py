"""``gpt2forge eval``: validation loss and/or HellaSwag of a model, printed as a table and saved as JSON.

Where results go: ``eval.json`` in the checkpoint directory when the model is one of our checkpoints (a run
directory resolves through its ``latest`` pointer), or ``--out FILE``. Other models (Hugging Face directories,
hub names) get their results printed only unless ``--out`` is given: their directories may be a shared hub
cache that is not ours to write into.

Under ``torchrun`` every rank evaluates its share (val batches and HellaSwag examples are strided over ranks)
and rank 0 prints and writes; the process group is created here when the launcher has not done so.
"""

from __future__ import annotations

import argparse
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from ..cli import positive_int, token_count
from ..errors import UserError
from ..files import atomic_write_json

DTYPES = ("fp32", "bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint dir, run dir, Hugging Face dir, or hub name (online)")
    parser.add_argument("--data", help="token shard directory: the validation loss uses its *_val_*.bin shards")
    parser.add_argument("--val-tokens", type=token_count,
                        help="evaluate at most this many val tokens, e.g. 10M or 1e7 (default: all)")
    parser.add_argument("--hellaswag", action="store_true", help="score HellaSwag (downloaded once into ~/.cache/gpt2forge)")
    parser.add_argument("--hellaswag-file", help="local hellaswag_val.jsonl (for offline use; implies --hellaswag)")
    parser.add_argument("--limit", type=positive_int, help="score only the first N HellaSwag rows")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward pass (default 16)")
    parser.add_argument("--seq-len", type=positive_int, help="val sequence length (default: the model's context)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, …")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="fp32, or bf16 autocast")
    parser.add_argument("--out", help="JSON results file (default: eval.json in our checkpoint dir; else print only)")
    parser.add_argument("--vocab-dir", help="folder with GPT-2's encoder.json + vocab.bpe (default: found automatically)")


def _init_distributed(device: str) -> tuple[int, int, str, bool]:
    """(rank, world size, this rank's device, whether we created the process group) from torchrun's env vars."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device, False
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device, False
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world_size, device, True


def training_position(checkpoint: Path | None) -> tuple[int | None, int | None]:
    """(step, tokens seen) of a checkpoint: from its ``train_state.json``, else the step from a ``step-N`` name."""
    from ..train.checkpoint import read_train_state

    if checkpoint is None:
        return None, None
    try:
        state = read_train_state(checkpoint)
        return int(state["step"]), int(state["tokens"]) if "tokens" in state else None
    except (UserError, ValueError, KeyError, TypeError):
        match = re.fullmatch(r"step-(\d+)", checkpoint.name)
        return (int(match.group(1)) if match else None), None


def format_table(results: dict) -> str:
    lines = [f"model      {results['model']}" + (f" (step {results['step']})" if results["step"] is not None else "")]
    if "val" in results:
        v = results["val"]
        lines.append(f"val loss   {v['loss']:.4f}   ({v['tokens']:,} tokens, {v['batches']} batches of {v['batch_size']}×{v['seq_len']})")
    if "hellaswag" in results:
        h = results["hellaswag"]
        lines.append(f"hellaswag  acc_norm {h['acc_norm']:.4f} ({h['correct_norm']}/{h['n']})   acc {h['acc']:.4f} ({h['correct']}/{h['n']})")
        notes = [f"{h['skipped']} rows skipped"] if h["skipped"] else []
        notes += [f"{h['truncated']} contexts left-truncated"] if h["truncated"] else []
        if notes:
            shown = "; ".join(f"line {s['line']}: {s['reason']}" for s in h["skipped_rows"][:3])
            lines.append(f"           {', '.join(notes)}" + (f" (e.g. {shown})" if shown else ""))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    import torch

    from ..device import device_name, hardware_summary, library_versions, pick_device
    from ..weights import load_model, our_checkpoint
    from .hellaswag import evaluate_hellaswag, load_hellaswag

    hellaswag = args.hellaswag or args.hellaswag_file is not None
    if args.limit is not None and not hellaswag:
        raise UserError("--limit counts HellaSwag rows: add --hellaswag (for the validation loss use --val-tokens)")
    if args.data is None and not hellaswag:
        raise UserError("nothing to evaluate: pass --data DIR (validation loss) and/or --hellaswag")
    if args.val_tokens is not None and args.data is None:
        raise UserError("--val-tokens needs --data DIR")
    rank, world_size, device, created_group = _init_distributed(pick_device(args.device))
    try:
        checkpoint = our_checkpoint(args.model)
        model = load_model(args.model, device)
        autocast = torch.bfloat16 if args.dtype == "bf16" else None
        step, tokens = training_position(checkpoint)
        results = {
            "model": str(args.model),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "step": step,
            "tokens_seen": tokens,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device),
            "dtype": args.dtype,
            "world_size": world_size,
            "versions": library_versions(), "hardware": hardware_summary(device),
        }
        if args.data is not None:
            results["val"] = _val_loss(model, args, device, autocast, rank, world_size)
        if hellaswag:
            from ..tokenizer import get_tokenizer

            data = load_hellaswag(args.hellaswag_file, limit=args.limit, tokenizer=get_tokenizer(args.vocab_dir))
            results["hellaswag"] = evaluate_hellaswag(
                model, data, device=device, batch_size=args.batch_size, autocast_dtype=autocast,
                rank=rank, world_size=world_size,
            )  # fmt: skip
        if rank == 0:
            print(format_table(results))
            out = Path(args.out) if args.out else (checkpoint / "eval.json" if checkpoint else None)
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(out, results)
                print(f"results written to {out}")
            else:
                print("(not a gpt2forge checkpoint: results not saved; pass --out FILE to save them)")
        return results
    finally:
        if created_group:
            torch.distributed.destroy_process_group()


def _val_loss(model, args, device: str, autocast, rank: int, world_size: int) -> dict:
    from ..data.loader import find_shards, val_batches
    from .loss import evaluate_loss

    seq_len = args.seq_len or model.config.block_size
    if seq_len > model.config.block_size:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {model.config.block_size} tokens")
    shards = find_shards(args.data, "val")
    batches = val_batches(args.data, args.batch_size, seq_len, rank=rank, world_size=world_size, max_tokens=args.val_tokens)
    result = evaluate_loss(model, batches, device=device, autocast_dtype=autocast, world_size=world_size)
    return {
        **result,
        "data": str(args.data),
        "shards": [p.name for p in shards],
        "batch_size": args.batch_size,
        "seq_len": seq_len,
        "max_tokens": args.val_tokens,
    }
