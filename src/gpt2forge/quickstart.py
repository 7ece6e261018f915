"""``gpt2forge quickstart``: the whole pipeline in a few CPU minutes, offline.

Prepares the embedded corpus (text that ships with Python), trains the tiny preset on it, compares the
validation loss with the corpus's unigram baseline (the loss of always predicting token frequencies: a model
that learned anything about context beats it clearly), writes the report plot and prints samples.
"""

from __future__ import annotations

import logging
import math

from .errors import UserError

log = logging.getLogger("gpt2forge.train")


def quickstart(data_dir: str, out_dir: str, steps: int | None = None, workers: int | None = None, *,
               overrides: list[str] = ()) -> dict:
    """Run the pipeline end to end; returns the final val loss, the baseline and the run directory.

    ``overrides`` (``--section.key=value``) change the quickstart recipe. The final comparison scores the model
    and the unigram baseline on the run's own validation tokens (``eval.val_tokens``): the numbers the training
    log printed, the report plots and ``gpt2forge eval --val-tokens`` gives are of the same tokens."""
    from .config import load_config
    from .data.flags import EMBEDDED_SHARD_SIZE, EMBEDDED_VAL_TOKENS
    from .data.loader import val_batches
    from .data.prepare import prepare
    from .data.sources import EmbeddedSource
    from .eval.baseline import unigram_loss
    from .eval.bpb import bits_per_byte, token_byte_lengths
    from .eval.loss import evaluate_loss
    from .eval.report import write_report
    from .sample import generate_text
    from .tokenizer import get_tokenizer
    from .train.trainer import setup_console_logging, train
    from .weights import load_model

    setup_console_logging()
    log.info("1/4 preparing the embedded corpus in %s", data_dir)
    prepare(EmbeddedSource(), data_dir, shard_size=EMBEDDED_SHARD_SIZE, val_tokens=EMBEDDED_VAL_TOKENS,
            prefix="embedded", workers=workers)
    settings = [f"--data.dir={data_dir}", f"--log.out_dir={out_dir}"]
    if steps is not None:
        settings.append(f"--train.max_steps={steps}")
    config = load_config("quickstart", [*settings, *overrides])
    log.info("2/4 training the tiny model for %d steps on the CPU (Ctrl-C stops and saves; re-run to resume)",
             config.train.max_steps)
    result = train(config, resume="auto")
    if result.stopped_by_signal:
        raise UserError(f"stopped at step {result.step}; run the same command again to continue")
    model = load_model(result.run_dir)
    t, val_tokens = config.train, config.eval.val_tokens
    baseline = unigram_loss(data_dir, t.seq_len, val_tokens, config.model.vocab_size)["loss"]
    batches = val_batches(data_dir, t.micro_batch_size, t.seq_len, max_tokens=val_tokens or None)
    scored = evaluate_loss(model, batches, device="cpu", progress=True, token_bytes=token_byte_lengths())
    val_loss = scored["loss"]
    log.info("3/4 the final model and the unigram baseline on the same %s val tokens (eval.val_tokens):",
             f"{scored['tokens']:,}")
    log.info("    validation loss %.3f vs unigram baseline %.3f: %.2f nats/token better (perplexity %.0f vs %.0f)",
             val_loss, baseline, baseline - val_loss, math.exp(val_loss), math.exp(baseline))
    log.info("    in bits per byte (the %s tokens are %s UTF-8 bytes): %.3f vs %.3f",
             f"{scored['tokens']:,}", f"{scored['bytes']:,}", scored["bpb"],
             bits_per_byte(baseline * scored["tokens"], scored["bytes"]))
    png, md = write_report(result.run_dir)
    log.info("    report: %s and %s", png, md)
    log.info("4/4 samples from %s:", result.run_dir)
    for i, text in enumerate(generate_text(model, get_tokenizer(), "The", num_samples=2, max_new_tokens=40, seed=1)):
        log.info("--- sample %d ---\nThe%s", i + 1, text)
    log.info("\nnext: `gpt2forge sample --model %s --prompt '...'`; the real run: see README.md", result.run_dir)
    return {"val_loss": val_loss, "val_bpb": scored["bpb"], "unigram_loss": baseline, "run_dir": result.run_dir}
