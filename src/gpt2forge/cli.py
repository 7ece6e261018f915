"""The ``gpt2forge`` command: parse a subcommand and its options, call one function, turn UserError into a message."""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def pick_device(name: str) -> str:
    """``auto`` means CUDA when present, else Apple MPS, else CPU."""
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def cmd_sample(args: argparse.Namespace) -> None:
    from .sample import print_samples
    from .tokenizer import get_tokenizer
    from .weights import load_model

    model = load_model(args.model, pick_device(args.device))
    tokenizer = get_tokenizer(args.vocab_dir)
    print_samples(
        model,
        tokenizer,
        args.prompt,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from .hf import export_hf
    from .weights import MODEL_FILE, load_model, read_model_config, resolve_checkpoint_dir, save_model

    model = load_model(args.source)
    target = args.to
    if target is None:  # the other format than the source's
        weights = resolve_checkpoint_dir(args.source) / MODEL_FILE
        ours = weights.is_file() and read_model_config(weights) is not None
        target = "hf" if ours else "gpt2forge"
    if target == "hf":
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        out = export_hf(model, args.out, dtype=dtype, vocab_dir=args.vocab_dir)
    else:
        from pathlib import Path

        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise UserError(f"output directory {out} exists and is not empty; choose a new one")
        out.mkdir(parents=True, exist_ok=True)
        save_model(model, out)
    print(f"wrote {out} ({target} format, {model.num_params():,} parameters)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt2forge", description="GPT-2 pretraining from scratch, end to end.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def vocab_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--vocab-dir", help="folder with GPT-2's encoder.json + vocab.bpe (default: found automatically)")

    p = sub.add_parser("sample", help="generate text from a checkpoint or Hugging Face model")
    p.add_argument("--model", required=True, help="checkpoint dir, run dir, Hugging Face dir, or hub name (online)")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--num-samples", type=_positive_int, default=1)
    p.add_argument("--max-new-tokens", type=_positive_int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    vocab_option(p)
    p.set_defaults(func=cmd_sample)

    for name, help_text in (
        ("convert", "convert weights between gpt2forge and Hugging Face formats"),
        ("export", "export a checkpoint for the ecosystem (same as convert --to hf)"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("source", help="checkpoint dir, run dir, Hugging Face dir, or hub name (online)")
        p.add_argument("out", help="new output directory")
        p.add_argument("--to", choices=("hf", "gpt2forge"), default="hf" if name == "export" else None,
                       help="output format (convert's default: the other one)")
        p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weight dtype for --to hf")
        vocab_option(p)
        p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"gpt2forge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2forge {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
