"""``gpt2forge convert`` / ``gpt2forge export``: move weights between our checkpoint format and Hugging Face's."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="checkpoint dir, run dir (its latest checkpoint), Hugging Face dir, or hub name")
    parser.add_argument("out", help="new output directory")
    parser.add_argument("--to", choices=("hf", "gpt2forge"), default=None,
                        help="output format (convert's default: the other one than the source's; export's: hf)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weight dtype for --to hf")
    parser.add_argument("--vocab-dir", help="folder with GPT-2's encoder.json + vocab.bpe (default: found automatically)")


def run(args: argparse.Namespace) -> None:
    import torch

    from ..hf import export_hf
    from ..weights import load_model, our_checkpoint, save_model

    model = load_model(args.source)
    target = args.to or ("hf" if args.command == "export" or our_checkpoint(args.source) else "gpt2forge")
    if target == "hf":
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        out = export_hf(model, args.out, dtype=dtype, vocab_dir=args.vocab_dir)
    else:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise UserError(f"output directory {out} exists and is not empty; choose a new one")
        out.mkdir(parents=True, exist_ok=True)
        save_model(model, out)
    print(f"wrote {out} ({target} format, {model.num_params():,} parameters)")
