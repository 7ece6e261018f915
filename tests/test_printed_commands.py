"""Every command line the library prints parses with the real parser (``commands/*``): a hint that names a renamed
or misspelled flag fails here, not in front of a user whose run just stopped.

Printed commands are found two ways. Statically: every string in ``src/`` holding a ``gpt2forge COMMAND ARGS``
in backticks or on a line of its own (f-string fields and ``%s`` become a placeholder argument; one elsewhere in
prose fails the test, as it could not be checked), and every ``prepare_line(...)`` call. Dynamically: the commands
built from run state (the command that made a data directory, the missing-data hints, train's resume command).
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from pathlib import Path

import pytest

import gpt2forge.commands.prepare as prepare_command_module
from gpt2forge.commands import COMMANDS, build_parser
from gpt2forge.commands.train import resolve
from gpt2forge.config import load_config
from gpt2forge.data.flags import FLAGS, missing_data_hint, prepare_command, prepare_line
from gpt2forge.data.manifest import Settings, tokenizer_description
from gpt2forge.train.guard import stop_advice
from gpt2forge.train.rundir import RunDir

SRC = Path(__file__).resolve().parents[1] / "src" / "gpt2forge"
PLACEHOLDER = "X"
MENTION = re.compile(r"gpt2forge (?P<command>[a-z]+)")


def parse(line: str) -> argparse.Namespace:
    """``line`` through the parser ``gpt2forge`` itself builds, refusing what ``main`` would refuse; overrides
    (``--section.key=value``) are resolved into a config, as ``train`` does."""
    words = shlex.split(line)
    assert words[0] == "gpt2forge" and words[1] in COMMANDS, line
    parser = build_parser(words[1])
    try:
        args, extra = parser.parse_known_args(words[2:])
    except SystemExit as e:
        if e.code == 0 and {"--help", "-h"} & set(words):
            return argparse.Namespace()  # --help prints the help and exits 0
        pytest.fail(f"the library prints a command its parser refuses: {line}")
    assert not extra or args.accepts_overrides, f"unrecognized arguments {extra} in printed command: {line}"
    if words[1] == "train":
        args.overrides = extra
        resolve(args)  # every override names a real setting with a valid value
    return args


# ---------------------------------------------------------------- found in the source


def _strings(tree: ast.AST):
    """(line number, text) of every string literal that is not a docstring; f-string fields become placeholders."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    parts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts.update(id(value) for value in node.values)
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else PLACEHOLDER for v in node.values)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                and id(node) not in parts):
            yield node.lineno, node.value


def _commands_in(text: str) -> tuple[list[str], list[str]]:
    """The commands with arguments in a printed text (in backticks, or on a line of their own), and any
    ``gpt2forge COMMAND --option`` written elsewhere in prose, which this test could not check."""
    text = text.replace("%s", PLACEHOLDER).replace("%d", "1")
    found = [span for span in re.findall(r"`([^`]*)`", text) if span.startswith("gpt2forge ")]
    found += [line.strip() for line in text.splitlines() if line.strip().startswith("gpt2forge ")]
    prose = re.sub(r"`[^`]*`", "", text)
    prose = "\n".join(line for line in prose.splitlines() if not line.strip().startswith("gpt2forge "))
    unchecked = [m.group(0) for m in re.finditer(r"gpt2forge [a-z]+ +-\S*", prose)]
    commands = [c for c in found if MENTION.match(c) and MENTION.match(c)["command"] in COMMANDS]
    return [c for c in commands if len(c.split()) > 2], unchecked  # `gpt2forge sample` alone names a command


def _prepare_line_calls(tree: ast.AST) -> list[str]:
    """What every ``prepare_line(...)`` call in the source prints, non-literal arguments as placeholders."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "prepare_line":
            args = [a.value if isinstance(a, ast.Constant) else PLACEHOLDER for a in node.args]
            if not any(isinstance(a, ast.Starred) for a in node.args):
                lines.append(prepare_line(*args))
    return lines


def test_every_command_written_in_the_source_parses():
    checked, unchecked = [], []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for lineno, text in _strings(tree):
            commands, loose = _commands_in(text)
            checked += [(f"{path.relative_to(SRC)}:{lineno}", c) for c in commands]
            unchecked += [f"{path.relative_to(SRC)}:{lineno}: {c}" for c in loose]
        checked += [(f"{path.relative_to(SRC)} prepare_line()", c) for c in _prepare_line_calls(tree)]
    assert not unchecked, ("print commands in backticks or on a line of their own, so that this test checks them:\n"
                           + "\n".join(unchecked))
    for where, line in checked:
        try:
            parse(line)
        except BaseException as e:
            raise AssertionError(f"{where}: {line}") from e
    found = {shlex.split(line)[1] for _, line in checked}
    assert {"prepare", "sample", "train"} <= found, found  # the scan sees what it should


def test_the_scan_catches_a_refused_flag_and_an_unchecked_command():
    commands, loose = _commands_in("finish it with:\n  gpt2forge prepare --config sample-10BT --out d\nor `gpt2forge "
                                   "prepare --verify d`; gpt2forge eval --hellaswag then")
    assert commands == ["gpt2forge prepare --verify d", "gpt2forge prepare --config sample-10BT --out d"]
    assert loose == ["gpt2forge eval --hellaswag"]
    with pytest.raises(BaseException):  # noqa: B017 (the failure pytest.fail raises)
        parse("gpt2forge prepare --dataset-cfg sample-10BT --out d")
    with pytest.raises(AssertionError, match="not an option of gpt2forge prepare: --config"):
        prepare_line("--config", "x")


# ---------------------------------------------------------------- built from run state


def settings(source: dict, **changes) -> dict:
    values = {"source": source, "text_column": "text", "min_score": None, "score_column": None, "max_tokens": None,
              "shard_size": 100_000_000, "val_tokens": 100_000_000, "prefix": "fineweb-edu",
              "tokenizer": tokenizer_description()}
    return Settings(**{**values, **changes}).as_json()


def remade(line: str, monkeypatch) -> dict:
    """The settings ``prepare`` would record when run with ``line``: parsed, then run up to the library call."""
    seen = {}

    def record(source, out, **options):
        seen.update(source=source.describe(), out=out, **options)

    monkeypatch.setattr(prepare_command_module, "prepare", record)
    args = parse(line)
    args.run(args)
    return seen


HUB = {"kind": "hub", "dataset": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT", "split": "train",
       "revision": None}


@pytest.mark.parametrize("case", [
    settings(HUB),  # the default recipe's data, which printed the refused --config before
    settings(HUB, min_score=3.0, score_column="int_score", max_tokens=10**10),
    settings({**HUB, "dataset": "org/other", "config": "en", "split": "validation", "revision": "v1.0"},
             text_column="content", min_score=2.5, score_column="score", prefix="other"),
    settings({**HUB, "dataset": "org/no-config", "config": None}, prefix="no-config", val_tokens=0),
    settings({"kind": "embedded"}, shard_size=10**6, val_tokens=250_000, prefix="embedded", max_tokens=1_500_000),
])
def test_the_command_that_made_a_directory_parses_and_remakes_its_settings(case, tmp_path, monkeypatch):
    out = tmp_path / "data dir"
    line = prepare_command(case, out)
    assert "--config " not in line
    seen = remade(line, monkeypatch)
    if case["source"]["kind"] == "hub":
        assert seen["source"] == case["source"]
    else:
        assert seen["source"]["kind"] == "embedded"
    assert str(seen["out"]) == str(out)
    for key in ("text_column", "min_score", "max_tokens", "shard_size", "val_tokens", "prefix"):
        assert seen[key] == case[key], (key, line)
    if case["min_score"] is not None:
        assert seen["score_column"] == case["score_column"]


def test_the_command_for_local_files_parses_and_names_the_same_files(tmp_path, monkeypatch):
    folder = tmp_path / "texts"
    folder.mkdir()
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text("some text\n")
    source = {"kind": "files", "format": "text", "txt_unit": "paragraph",
              "files": [{"path": str(folder / n), "bytes": 10} for n in ("a.txt", "b.txt")]}
    line = prepare_command(settings(source, prefix="local"), tmp_path / "out")
    assert f"--files {folder} --txt-unit paragraph" in line  # their folder holds exactly them
    seen = remade(line, monkeypatch)
    assert seen["source"] == source and seen["prefix"] == "local"


def test_missing_data_hints_parse_and_do_not_download_for_the_quickstart(tmp_path):
    for directory, first in (("data/embedded", "--embedded"), (tmp_path / "fineweb", None)):
        hint = missing_data_hint(directory)
        commands, loose = _commands_in(hint)
        assert commands and not loose
        for line in commands:
            parse(line)
        assert (first in commands[0]) if first else commands[0] == f"gpt2forge prepare --out {directory}"
    assert "gpt2forge quickstart" in missing_data_hint("data/embedded")
    assert "download" in missing_data_hint(tmp_path / "fineweb")


def test_trains_resume_command_and_divergence_advice_parse(tmp_path):
    argv = ["train", "--config", "quickstart", "--resume", "elsewhere", "--optim.lr=1e-3", "--data",
            str(tmp_path / "d"), "--train.max_steps=20"]
    config = load_config("quickstart", ["--optim.lr=1e-3"])
    rundir = RunDir(config, argv)
    checkpoint = tmp_path / "run" / "step-000010"
    line = rundir.resume_command(checkpoint)
    args = parse(line)
    assert args.resume == str(checkpoint) and "elsewhere" not in line
    assert args.overrides == ["--optim.lr=1e-3", "--train.max_steps=20"] and args.data == str(tmp_path / "d")
    advice = stop_advice(checkpoint, rundir.resume_command, config.optim)
    command = advice.split("with a lower one: ")[1].split(" --train.reschedule=true")[0] + " --train.reschedule=true"
    args = parse(command)
    assert args.resume == str(checkpoint) and args.overrides[-2:] == ["--optim.lr=0.0005", "--train.reschedule=true"]


def test_every_prepare_flag_is_an_option_of_the_parser():
    options = {a.option_strings[0] for a in build_parser("prepare")._actions if a.option_strings}
    assert {flag.option for flag in FLAGS} <= options


def test_the_quickstart_recipes_without_their_data_name_the_offline_command(tmp_path, monkeypatch, capsys):
    from gpt2forge.cli import main

    monkeypatch.chdir(tmp_path)  # the recipes' data.dir, data/embedded, does not exist here
    for recipe in ("quickstart", "quickstart-modern"):
        assert main(["train", "--config", recipe, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "`gpt2forge prepare --embedded --out data/embedded`" in err and "gpt2forge quickstart" in err
        assert "download" not in err
