"""``gpt2forge sample``: generate text from a checkpoint or Hugging Face model, streamed (``sample.py``)."""

from __future__ import annotations

import argparse

from . import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint dir, run dir, Hugging Face dir, or hub name (online)")
    parser.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    parser.add_argument("--num-samples", type=positive_int, default=1)
    parser.add_argument("--max-new-tokens", type=positive_int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=positive_int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, …")
    parser.add_argument("--vocab-dir", help="folder with GPT-2's encoder.json + vocab.bpe (default: found automatically)")


def run(args: argparse.Namespace) -> None:
    from ..device import pick_device
    from ..sample import check_options, print_samples
    from ..tokenizer import get_tokenizer
    from ..weights import load_model

    check_options(args.temperature, args.top_k, args.top_p)
    model = load_model(args.model, pick_device(args.device))
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed)
    print_samples(model, get_tokenizer(args.vocab_dir), args.prompt, num_samples=args.num_samples, **options)
