"""``gpt2forge sample``: generate text from a checkpoint or Hugging Face model, streamed (``sample.py``)."""

from __future__ import annotations

import argparse

from . import MODEL_HELP, VOCAB_HELP, non_negative_int, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..sample import DEFAULT_TOP_K

    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    parser.add_argument("--num-samples", type=positive_int, default=1)
    parser.add_argument("--max-new-tokens", type=positive_int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=non_negative_int, default=DEFAULT_TOP_K,
                        help=f"sample from the k most likely tokens (default {DEFAULT_TOP_K}, as the trainer's and the "
                             "quickstart's samples); 0 = off: the whole vocabulary")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of tokens whose "
                                                                  "probability reaches p (default off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, …")
    parser.add_argument("--vocab-dir", help=VOCAB_HELP)


def run(args: argparse.Namespace) -> None:
    from ..device import resolve_device
    from ..sample import check_options, print_samples
    from ..tokenizer import get_tokenizer
    from ..weights import load_model

    top_k = args.top_k or None  # 0 = off
    check_options(args.temperature, top_k, args.top_p)
    model = load_model(args.model, resolve_device(args.device, "--device"))
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=top_k,
                   top_p=args.top_p, seed=args.seed)
    print_samples(model, get_tokenizer(args.vocab_dir), args.prompt, num_samples=args.num_samples, **options)
