"""``gpt2forge sample``: generate text from a checkpoint or Hugging Face model, streamed (``sample.py``)."""

from __future__ import annotations

import argparse

from ..eval.evaluate import PRECISIONS
from . import MODEL_HELP, VOCAB_HELP, non_negative_int, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..sample import DEFAULT_TOP_K

    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--prompt", default="", help="text to continue (default empty: start a new document)")
    parser.add_argument("--num-samples", type=positive_int, default=1,
                        help="samples to draw, in one batch (default 1: streamed as it is generated)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=100,
                        help="tokens to generate per sample at most; a sample ends earlier at <|endoftext|> "
                             "(default 100)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=non_negative_int, default=DEFAULT_TOP_K,
                        help=f"sample from the k most likely tokens (default {DEFAULT_TOP_K}, as the trainer's and the "
                             "quickstart's samples); 0 = off: the whole vocabulary")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of tokens whose "
                                                                  "probability reaches p (default off)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed: the same seed gives the same text (default 0)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA, then MPS, then CPU; the default), cpu, cuda, cuda:1, …")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="compute precision, as train.precision: fp32 (default), bf16 autocast (faster on "
                             "GPUs), or auto (bf16 on GPUs that compute it natively)")
    parser.add_argument("--vocab-dir", help=VOCAB_HELP)


def run(args: argparse.Namespace) -> None:
    from ..device import autocast, autocast_dtype, resolve_device
    from ..sample import check_options, print_samples
    from ..tokenizer import get_tokenizer
    from ..weights import load_model

    top_k = args.top_k or None  # 0 = off
    check_options(args.temperature, top_k, args.top_p)
    device = resolve_device(args.device, "--device")
    model = load_model(args.model, device)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=top_k,
                   top_p=args.top_p, seed=args.seed)
    with autocast(device, autocast_dtype(args.precision, device)):
        print_samples(model, get_tokenizer(args.vocab_dir), args.prompt, num_samples=args.num_samples, **options)
