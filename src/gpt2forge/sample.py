"""Text generation: the decoding loop (KV-cached, sliding past the context), the sampling policy, streaming text.

The model only supplies the contract's ``forward(idx, cache=...)`` and ``new_cache``; how the next token is
chosen (greedy, temperature, top-k, top-p) is decided here.
"""

from __future__ import annotations

import codecs
import math
import sys
from collections.abc import Callable, Iterator

import torch

from .errors import UserError
from .tokenizer import EOT_TOKEN, Tokenizer

DEFAULT_TOP_K = 50  # the default of generate_text and `gpt2forge sample`, as in the trainer's samples (top-k 50)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row from last-position logits [B, V]: greedy, or temperature / top-k / top-p sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stop_token: int | None = EOT_TOKEN,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, one step at a time.

    ``temperature=0`` is greedy. Rows that produced ``stop_token`` keep yielding it; iteration ends once every
    row has stopped. Past the context length the window slides: the model sees the last ``block_size`` tokens,
    exactly as without a cache (the cache is then rebuilt each step).
    """
    block = model.config.block_size
    cache = None
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    pending = idx  # tokens the model has not yet seen
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = model(idx[:, -block:])
        else:
            if cache is None or cache.pos + pending.size(1) > block:
                cache = model.new_cache(idx.size(0))
                pending = idx[:, -block:]
            logits, _ = model(pending, cache=cache)
        next_token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
        if stop_token is not None:
            next_token = torch.where(done, torch.full_like(next_token, stop_token), next_token)
            done |= next_token == stop_token
        yield next_token
        idx = torch.cat([idx, next_token[:, None]], dim=1)
        pending = next_token[:, None]
        if stop_token is not None and bool(done.all()):
            return


def generate(model, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """``idx`` extended by up to ``max_new_tokens`` sampled tokens (see ``stream`` for the options)."""
    new = list(stream(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx


def check_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature must be a finite number ≥ 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be a positive integer, got {top_k}")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")


def encode_prompt(tokenizer: Tokenizer, prompt: str, model_config, option: str = "--prompt") -> list[int]:
    """Prompt tokens (``<|endoftext|>`` alone for an empty prompt), refusing prompts that fill the context or use
    token ids the model's vocabulary does not have."""
    tokens = tokenizer.encode(prompt) if prompt else [tokenizer.eot]
    context, vocab = model_config.block_size, model_config.vocab_size
    if len(tokens) >= context:
        raise UserError(f"{option} is {len(tokens)} tokens long, but the model's context is {context} tokens")
    if max(tokens) >= vocab:
        raise UserError(f"{option} encodes to GPT-2 token id {max(tokens)}, but this model's vocabulary has only "
                        f"{vocab} tokens (it was trained on other token ids): it cannot read GPT-2 text")
    return tokens


def generate_text(
    model,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = DEFAULT_TOP_K,
    top_p: float | None = None,
    seed: int = 0,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Sample ``num_samples`` continuations of ``prompt`` (all rows in one batch) and return their texts.
    ``top_k=None`` samples from the whole vocabulary.

    ``on_text(row, piece)`` receives decoded text as it is produced (UTF-8 sequences split across tokens are
    held back until complete), which is how the CLI streams to the terminal.
    """
    check_options(temperature, top_k, top_p)
    device = next(model.parameters()).device
    tokens = encode_prompt(tokenizer, prompt, model.config)
    idx = torch.tensor([tokens] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in range(num_samples)]
    texts = [""] * num_samples
    finished = [False] * num_samples
    steps = stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   generator=generator, stop_token=tokenizer.eot)
    for step in steps:
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


def print_samples(model, tokenizer: Tokenizer, prompt: str, num_samples: int = 1, **options) -> list[str]:
    """Generate and print samples: one sample streams live; several are printed in turn once done."""
    if num_samples == 1:
        sys.stdout.write(prompt)

        def on_text(_row: int, piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        texts = generate_text(model, tokenizer, prompt, num_samples=1, on_text=on_text, **options)
        sys.stdout.write("\n")
        return texts
    texts = generate_text(model, tokenizer, prompt, num_samples=num_samples, **options)
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1}/{num_samples} ---\n{prompt}{text}")
    return texts
