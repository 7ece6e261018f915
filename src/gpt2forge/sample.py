"""Text generation from a model, streamed token by token."""

from __future__ import annotations

import argparse
import codecs
import sys
from collections.abc import Callable

import torch

from .cli import positive_int
from .errors import UserError
from .model import GPT
from .tokenizer import Tokenizer


def encode_prompt(tokenizer: Tokenizer, prompt: str, context: int, option: str = "--prompt") -> list[int]:
    """Prompt tokens (``<|endoftext|>`` alone for an empty prompt), refusing prompts that fill the context."""
    tokens = tokenizer.encode(prompt) if prompt else [tokenizer.eot]
    if len(tokens) >= context:
        raise UserError(f"{option} is {len(tokens)} tokens long, but the model's context is {context} tokens")
    return tokens


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Sample ``num_samples`` continuations of ``prompt`` (all rows in one batch) and return their texts.

    ``on_text(row, piece)`` receives decoded text as it is produced (UTF-8 sequences split across tokens are
    held back until complete), which is how the CLI streams to the terminal.
    """
    device = next(model.parameters()).device
    tokens = encode_prompt(tokenizer, prompt, model.config.block_size)
    idx = torch.tensor([tokens] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(num_samples)]
    texts = [""] * num_samples
    finished = [False] * num_samples
    for step in model.stream(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator):
        for row, token in enumerate(step.tolist()):
            if finished[row]:
                continue
            if token == tokenizer.eot:
                finished[row] = True
                continue
            piece = decoders[row].decode(tokenizer.decode_bytes([token]))
            texts[row] += piece
            if on_text is not None and piece:
                on_text(row, piece)
    return texts


def print_samples(model: GPT, tokenizer: Tokenizer, prompt: str, num_samples: int = 1, **options) -> list[str]:
    """Generate and print samples: one sample streams live; several are printed in turn once done."""
    if num_samples == 1:
        sys.stdout.write(prompt)

        def stream(_row: int, piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        texts = generate_text(model, tokenizer, prompt, num_samples=1, on_text=stream, **options)
        sys.stdout.write("\n")
        return texts
    texts = generate_text(model, tokenizer, prompt, num_samples=num_samples, **options)
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1}/{num_samples} ---\n{prompt}{text}")
    return texts


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
    from .device import pick_device
    from .tokenizer import get_tokenizer
    from .weights import load_model

    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
        raise UserError("--temperature must be ≥ 0 and --top-p in (0, 1]")
    model = load_model(args.model, pick_device(args.device))
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print_samples(model, get_tokenizer(args.vocab_dir), args.prompt, num_samples=args.num_samples, **options)
