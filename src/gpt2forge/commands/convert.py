"""``gpt2forge convert`` / ``gpt2forge export``: move weights between our checkpoint format and Hugging Face's."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from . import MODEL_HELP, VOCAB_HELP

WEIGHTS_DTYPES = ("fp32", "bf16", "fp16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = f"{parser.prog} [--model] MODEL [--out] OUT [options]"
    parser.add_argument("source", nargs="?", metavar="MODEL", help="the model to convert (or --model): " + MODEL_HELP)
    parser.add_argument("destination", nargs="?", metavar="OUT", help="new output directory (or --out)")
    parser.add_argument("--model", metavar="MODEL",
                        help="the model, instead of the first positional (as in eval and sample)")
    parser.add_argument("--out", metavar="OUT", help="the output directory, instead of the second positional")
    exporting = parser.prog.endswith(" export")
    parser.add_argument("--to", choices=("hf", "gpt2forge"), default=None,
                        help="output format: hf only (export is for the ecosystem; our format: `gpt2forge convert "
                             "MODEL OUT --to gpt2forge`)" if exporting else
                             "output format (default: the other one than the source's)")
    parser.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES, default="fp32",
                        help="dtype the Hugging Face weights are stored in (--to hf; default fp32). Not a compute "
                             "precision: for that, see eval --precision and train.precision")
    parser.add_argument("--dtype", dest="weights_dtype", choices=WEIGHTS_DTYPES, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)  # old spelling
    parser.add_argument("--vocab-dir", help="--to hf: " + VOCAB_HELP + "; its tokenizer files go into the export")


def model_and_out(args: argparse.Namespace) -> tuple[str, str]:
    """MODEL and OUT, each given as a positional or as --model / --out."""
    positionals = [p for p in (args.source, args.destination) if p is not None]
    model = args.model if args.model is not None else (positionals.pop(0) if positionals else None)
    out = args.out if args.out is not None else (positionals.pop(0) if positionals else None)
    if model is None or out is None:
        raise UserError(f"gpt2forge {args.command} needs the model and a new output directory: "
                        f"gpt2forge {args.command} MODEL OUT (or --model MODEL --out OUT)")
    if positionals:
        raise UserError(f"unexpected argument {positionals[0]!r}: the model and the output directory are already given")
    return model, out


def run(args: argparse.Namespace) -> None:
    import torch

    from ..hf import export_hf
    from ..weights import load_model, our_checkpoint, save_model

    if args.command == "export" and args.to == "gpt2forge":
        raise UserError("export writes the Hugging Face format only; to write our checkpoint format use "
                        "`gpt2forge convert MODEL OUT --to gpt2forge`")
    source, destination = model_and_out(args)
    model = load_model(source)
    target = args.to or ("hf" if args.command == "export" or our_checkpoint(source) else "gpt2forge")
    if target == "hf":
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.weights_dtype]
        out = export_hf(model, destination, dtype=dtype, vocab_dir=args.vocab_dir, card=card_facts(source))
    else:
        out = Path(destination)
        if out.exists() and any(out.iterdir()):
            raise UserError(f"output directory {out} exists and is not empty; choose a new one")
        out.mkdir(parents=True, exist_ok=True)
        save_model(model, out)
    print(f"wrote {out} ({target} format, {model.num_params():,} parameters)")


def card_facts(source: str) -> dict:
    """What the model card reports of one of our checkpoints: run name, step and tokens, the resolved recipe and
    its data, and the scores measured on it (eval.json from `gpt2forge eval`, else the training loop's last)."""
    import json

    from ..config import tomllib
    from ..runs import RUN_CONFIG, training_position
    from ..weights import our_checkpoint

    checkpoint = our_checkpoint(source)
    if checkpoint is None:
        return {"name": Path(source).name}
    step, tokens = training_position(checkpoint)
    facts = {"name": checkpoint.parent.name, "step": step, "tokens": tokens}
    if (checkpoint / RUN_CONFIG).is_file():
        recipe = (checkpoint / RUN_CONFIG).read_text()
        config = tomllib.loads(recipe)
        facts.update(recipe=recipe, recipe_name=config.get("name") or "unnamed",
                     data=config.get("data", {}).get("dir", "unknown"))
    scores = {}
    for name in ("training_eval.json", "eval.json"):  # eval.json's numbers win
        path = checkpoint / name
        if path.is_file():
            saved = json.loads(path.read_text())
            scores.update({k: v for k, v in saved.items() if isinstance(v, float)})
            if "val" in saved:
                scores.update({"val_loss": saved["val"]["loss"], "val_bpb": saved["val"].get("bpb")})
            if "hellaswag" in saved:
                scores["hellaswag_acc_norm"] = saved["hellaswag"]["acc_norm"]
            if "tasks" in saved:
                scores["core"] = saved["tasks"]["core"]
                scores.update({f"{t}_{r['metric']}": r["accuracy"] for t, r in saved["tasks"]["tasks"].items()})
    facts["scores"] = {k: v for k, v in scores.items() if v is not None and k not in ("step", "tokens")}
    return facts
