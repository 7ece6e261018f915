import subprocess
import sys

import torch

from gpt2forge.cli import main
from gpt2forge.weights import load_model, save_model


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gpt2forge.cli", *args], capture_output=True, text=True)


def test_sample_streams_text(tmp_path, tiny_model, capsys):
    save_model(tiny_model, tmp_path)
    args = ["sample", "--model", str(tmp_path), "--prompt", "Hello world", "--max-new-tokens", "12", "--seed", "1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("Hello world") and len(first) > len("Hello world\n")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    assert main([*args, "--num-samples", "2", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "sample 1/2" in out and "sample 2/2" in out


def test_prompt_longer_than_context_is_a_clear_error(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path)
    result = run_cli("sample", "--model", str(tmp_path), "--prompt", ("word " * 100).strip())
    assert result.returncode == 2
    assert "--prompt is 100 tokens long, but the model's context is 64 tokens" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_is_a_clear_error(tmp_path):
    result = run_cli("sample", "--model", str(tmp_path / "nothing-here"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_convert_hf_to_ours_and_export_back(tmp_path, hf_model_dir):
    assert main(["convert", str(hf_model_dir), str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "model.safetensors").is_file()
    assert main(["export", str(tmp_path / "ours"), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert main(["export", str(hf_model_dir), str(tmp_path / "hf-again")]) == 0  # export means Hugging Face format
    assert (tmp_path / "hf-again" / "config.json").is_file()
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "merges.txt").is_file()
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        a, b = load_model(hf_model_dir)(idx)[0], load_model(tmp_path / "hf")(idx)[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_every_command_has_help():
    from gpt2forge.commands import COMMANDS

    for command in COMMANDS:
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "usage: gpt2forge " + command in result.stdout
    result = run_cli("frobnicate")
    assert result.returncode == 2 and "unknown command 'frobnicate'" in result.stderr
