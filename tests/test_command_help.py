"""The smaller commands' options: every one explained in ``--help`` with its default, ``sample --precision``,
``export --to gpt2forge`` refused with the command that does it."""

import argparse

import pytest
import torch

import gpt2forge.sample
from gpt2forge.cli import main
from gpt2forge.commands import build_parser
from gpt2forge.weights import save_model


@pytest.mark.parametrize("command", ["sample", "report", "export", "convert", "prepare"])
def test_every_option_has_help_naming_its_default(command):
    for action in build_parser(command)._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        has_default = action.default not in (None, False, [], argparse.SUPPRESS) or action.required
        if has_default and not action.required:
            assert "default" in action.help, f"{command} {action.option_strings}: help does not name the default"


@pytest.mark.parametrize("precision, dtype", [(None, torch.float32), ("fp32", torch.float32),
                                              ("bf16", torch.bfloat16)])
def test_sample_computes_in_the_precision_asked(tmp_path, tiny_model, monkeypatch, capsys, precision, dtype):
    save_model(tiny_model, tmp_path)
    seen, real = [], gpt2forge.sample.sample_next
    monkeypatch.setattr(gpt2forge.sample, "sample_next",
                        lambda logits, *a: seen.append(logits.dtype) or real(logits, *a))
    args = ["sample", "--model", str(tmp_path), "--device", "cpu", "--max-new-tokens", "3", "--prompt", "Hi"]
    assert main([*args, *(["--precision", precision] if precision else [])]) == 0
    assert seen and set(seen) == {dtype} and capsys.readouterr().out.startswith("Hi")


def test_export_to_our_format_is_refused_naming_convert(tmp_path, tiny_model, capsys):
    save_model(tiny_model, tmp_path / "ours")
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "out"), "--to", "gpt2forge"]) == 2
    err = capsys.readouterr().err
    assert "export writes the Hugging Face format only" in err and "gpt2forge convert MODEL OUT --to gpt2forge" in err
    assert not (tmp_path / "out").exists()
