"""``gpt2forge eval``: validation loss and/or HellaSwag of a model, as a table and JSON (``eval/evaluate.py``)."""

from __future__ import annotations

import argparse

from ..eval.evaluate import PRECISIONS, evaluate, format_table, results_path, write_results
from . import MODEL_HELP, VOCAB_HELP, positive_int, token_count


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
        hellaswag_file=args.hellaswag_file, hellaswag_limit=args.hellaswag_limit, batch_size=args.batch_size,
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
