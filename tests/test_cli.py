import os
import stat
import subprocess
import sys

import pytest
import torch

from gpt2forge.cli import main
from gpt2forge.commands import build_parser
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
    assert main([*args, "--top-k", "0"]) == 0  # 0 = no top-k: the whole vocabulary
    assert capsys.readouterr().out != first


def test_sample_defaults_to_top_k_50_like_the_trainers_samples():
    assert build_parser("sample").parse_args(["--model", "m"]).top_k == 50
    assert build_parser("sample").parse_args(["--model", "m", "--top-k", "0"]).top_k == 0
    with pytest.raises(SystemExit):
        build_parser("sample").parse_args(["--model", "m", "--top-k", "-1"])


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
    assert main(["export", "--model", str(tmp_path / "ours"), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(hf_model_dir), str(tmp_path / "hf-again")]) == 0  # export means Hugging Face format
    assert (tmp_path / "hf-again" / "config.json").is_file()
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "merges.txt").is_file()
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        a, b = load_model(hf_model_dir)(idx)[0], load_model(tmp_path / "hf")(idx)[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_every_command_has_help(capsys):
    from gpt2forge.commands import COMMANDS

    for command in COMMANDS:  # in this process: a subprocess each cost ~1.5 s of imports
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        assert exited.value.code == 0 and "usage: gpt2forge " + command in capsys.readouterr().out
    assert main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_directories_are_readable_as_the_umask_allows(tmp_path, tiny_model, umask):
    """Not mkdtemp's 0700 (and safetensors' 0600): a colleague on a shared filesystem can read the export."""
    from gpt2forge.hf import export_hf

    old = os.umask(umask)
    try:
        out = export_hf(tiny_model, tmp_path / "hf")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = list(out.iterdir())
    assert "model.safetensors" in {f.name for f in files}
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o666 & ~umask for f in files}


def parsed(command, *args):
    return build_parser(command).parse_known_args(list(args))[0]


def test_one_spelling_per_concept_and_old_spellings_still_parse():
    # output location: --out; data location: --data (train: short for --data.dir / --log.out_dir)
    new = parsed("quickstart", "--data", "d", "--out", "o")
    assert (new.data, new.out) == ("d", "o")
    assert (parsed("quickstart", "--data-dir", "d").data, parsed("quickstart", "--out-dir", "o").out) == ("d", "o")
    assert parsed("bench").out == "out/bench"  # not the current directory's benchmarks/results
    # compute precision (eval) vs the dtype weights are stored in (convert / export)
    assert parsed("eval", "--model", "m").precision == "fp32"
    assert parsed("eval", "--model", "m", "--precision", "auto").precision == "auto"
    assert parsed("eval", "--model", "m", "--dtype", "bf16").precision == "bf16"
    assert parsed("eval", "--model", "m", "--limit", "3").hellaswag_limit == 3
    assert parsed("export", "a", "b", "--weights-dtype", "bf16").weights_dtype == "bf16"
    assert parsed("export", "a", "b", "--dtype", "fp16").weights_dtype == "fp16"
    # hidden aliases stay out of the help
    for command, old in [("eval", "--dtype"), ("eval", "--limit"), ("quickstart", "--data-dir"),
                         ("quickstart", "--out-dir"), ("export", "--dtype"), ("prepare", "--config")]:
        assert old not in build_parser(command).format_help(), (command, old)


def test_model_and_out_work_as_options_or_positionals():
    from gpt2forge.commands.convert import model_and_out
    from gpt2forge.errors import UserError

    def resolve(*args):
        namespace = parsed("convert", *args)
        namespace.command = "convert"
        return model_and_out(namespace)

    assert resolve("m", "o") == resolve("--model", "m", "--out", "o") == resolve("--model", "m", "o") == ("m", "o")
    assert resolve("--out", "o", "m") == ("m", "o")
    with pytest.raises(UserError, match="needs the model and a new output directory"):
        resolve("m")
    with pytest.raises(UserError, match="unexpected argument 'x'"):
        resolve("--model", "m", "--out", "o", "x")


def test_prepare_config_is_now_dataset_config(capsys):
    assert parsed("prepare", "--dataset-config", "sample-100BT").dataset_config == "sample-100BT"
    assert main(["prepare", "--config", "sample-100BT", "--out", "x"]) == 2
    assert "--config is now --dataset-config" in capsys.readouterr().err


def test_train_shorthands_for_data_and_out(capsys):
    assert main(["train", "--config", "quickstart", "--data", "d", "--out", "o", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert 'dir = "d"' in out and 'out_dir = "o"' in out
    assert main(["train", "--data", "d", "--data.dir=e", "--print-config"]) == 2
    assert "--data and --data.dir both given" in capsys.readouterr().err


def test_train_help_lists_every_setting_with_type_default_and_doc(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # docstrings are re-wrapped to the terminal
    assert "--optim.lr FLOAT default: 0.0006 Peak learning rate (AdamW's)" in help_text
    assert "--train.precision {auto,bf16,fp32} default: auto" in help_text
    assert "--model.arch {gpt2" in help_text and "--print-config" in help_text


def test_progress_goes_to_stderr_as_lines_when_not_a_terminal(capsys):
    from gpt2forge.progress import progress_bar

    assert list(progress_bar(range(5), total=5, desc="val loss", unit="batch")) == list(range(5))
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith("val loss: 100%") and "5/5" in err
    assert list(progress_bar(range(3), total=3, desc="x", unit="batch", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    with progress_bar(total=2_000_000, desc="prepare x", unit="tok", unit_scale=True) as bar:  # prepare's kind
        bar.update(2_000_000)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith("prepare x: 100%") and "2.00M/2.00M" in err


def test_eval_shows_progress_on_stderr_and_results_on_stdout(tmp_path, tiny_model, capsys):
    from test_eval_loss import checkpoint, make_val_dir

    data, ckpt = make_val_dir(tmp_path / "data"), checkpoint(tmp_path, tiny_model)
    assert main(["eval", "--model", str(ckpt), "--data", str(data), "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "val loss: 100%" in captured.err and "9/9" in captured.err and "val loss   " in captured.out
    assert main(["eval", "--model", str(ckpt), "--data", str(data), "--batch-size", "2", "--no-progress"]) == 0
    assert "val loss:" not in capsys.readouterr().err
