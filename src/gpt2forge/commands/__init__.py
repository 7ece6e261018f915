"""The ``gpt2forge`` command: the only place with argparse. One module per subcommand, each with
``add_arguments(parser)`` and ``run(args)``, calling plain library functions (``prepare()``, ``train()``,
``evaluate()``, ``write_report()``, …) that a notebook can call the same way.

Only the chosen command's module is imported, so ``gpt2forge sample`` does not pay for ``datasets`` and friends.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import dist
from ..errors import UserError
from ..files import explain, is_filesystem_error

COMMANDS: dict[str, str] = {  # name: one-line help (the module is gpt2forge.commands.<name>)
    "quickstart": "prepare the embedded corpus, train the tiny model on CPU, evaluate, sample",
    "prepare": "tokenize a dataset (hub, local files, embedded corpus) into shards",
    "train": "pretrain from a TOML recipe with dotted overrides; resumable",
    "eval": "validation loss and HellaSwag of a checkpoint or Hugging Face model",
    "report": "plots and a markdown summary of a run against the reference numbers",
    "sample": "generate text from a checkpoint or Hugging Face model",
    "convert": "convert weights between gpt2forge and Hugging Face formats",
    "export": "export a checkpoint for the ecosystem: an alias of convert (--to hf)",
    "bench": "optimization ablation, trainer overhead and data throughput, side by side",
}
MODULES = {"export": "convert"}  # commands that share a module
MODEL_HELP = "checkpoint dir, run dir (its newest checkpoint), Hugging Face dir, or hub name (online)"
VOCAB_HELP = "folder with GPT-2's encoder.json + vocab.bpe (default: found automatically)"


def _int_at_least(text: str, low: int, bound: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse type: an integer ≥ 0."""
    return _int_at_least(text, 0, "0 or more")


def token_count(text: str) -> int:
    """An argparse type: a whole, non-negative number of tokens, like 1000, 100_000_000, 1e8, 250K, 100M, 10B."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 1000, 1e8, 250K, 100M)") from None
    if value < 0 or value * scale != int(value * scale):
        raise argparse.ArgumentTypeError(f"not a whole, non-negative count: {text!r}")
    return int(value * scale)


def build_parser(command: str) -> argparse.ArgumentParser:
    module = importlib.import_module(f"{__name__}.{MODULES.get(command, command)}")
    parser = argparse.ArgumentParser(prog=f"gpt2forge {command}", description=COMMANDS[command],
                                     formatter_class=getattr(module, "FORMATTER", argparse.HelpFormatter))
    module.add_arguments(parser)
    parser.set_defaults(run=module.run, accepts_overrides=getattr(module, "ACCEPTS_OVERRIDES", False))
    return parser


def top_level_help() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: gpt2forge COMMAND [options]   (gpt2forge COMMAND --help for its options; gpt2forge --version)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, help_text in COMMANDS.items()]
    return "\n".join(lines)


def version_line() -> str:
    """``gpt2forge --version``: ours, and what a bug report needs next to it (read without importing torch)."""
    import platform
    from importlib import metadata

    import gpt2forge

    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    return f"gpt2forge {gpt2forge.__version__} (Python {platform.python_version()}, torch {torch})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version_line())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"gpt2forge: unknown command {command!r}\n\n{top_level_help()}", file=sys.stderr)
        return 2
    parser = build_parser(command)
    args, extra = parser.parse_known_args(rest)
    if extra and not args.accepts_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.command, args.overrides, args.argv = command, extra, argv
    try:
        args.run(args)
    except UserError as e:  # under torchrun every rank has it: the main one says it (unless it is a rank's own)
        if dist.is_main() or getattr(e, "every_rank", False):
            rank = f" (rank {dist.rank()})" if dist.world_size() > 1 else ""
            print(f"gpt2forge {command}{rank}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the last line of defence: a filesystem error nothing nearer the work explained
        if not is_filesystem_error(e):
            raise
        print(f"gpt2forge {command}: error: {explain(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpt2forge {command}: interrupted", file=sys.stderr)
        return 130
    return 0
