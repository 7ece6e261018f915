"""Weights on disk are as readable as anything else the process writes (0666 & ~umask, not safetensors' 0600):
checkpoints, converted weights and exports can be read by the group on a shared filesystem. ``save_model`` into a
directory that does not exist yet creates it."""

import os
import stat

import pytest
from conftest import VOCAB

from gpt2forge.cli import main
from gpt2forge.config import load_config
from gpt2forge.train.trainer import train
from gpt2forge.weights import load_model, save_model


@pytest.fixture(params=[0o022, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_model_creates_the_directory_and_a_readable_file(tmp_path, tiny_model, umask):
    path = save_model(tiny_model, tmp_path / "not" / "yet")
    assert path == tmp_path / "not" / "yet" / "model.safetensors" and mode(path) == 0o666 & ~umask
    assert load_model(tmp_path / "not" / "yet").num_params() == tiny_model.num_params()


def test_converted_weights_are_readable_by_the_group(tmp_path, hf_model_dir, umask):
    assert main(["convert", str(hf_model_dir), str(tmp_path / "ours"), "--to", "gpt2forge"]) == 0
    assert mode(tmp_path / "ours" / "model.safetensors") == 0o666 & ~umask


def test_checkpoint_files_are_readable_by_the_group(tmp_path, data_dir, umask):
    settings = {"model.preset": "tiny", "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32,
                "model.block_size": 32, "model.vocab_size": VOCAB, "model.vocab_multiple": 64, "data.dir": data_dir,
                "log.out_dir": tmp_path, "log.run_name": "run", "train.max_steps": 1, "train.micro_batch_size": 2,
                "train.seq_len": 32, "train.total_batch_tokens": 64, "train.device": "cpu", "train.precision": "fp32",
                "train.compile": False, "eval.val_every": 0, "eval.hellaswag_every": 0, "eval.sample_every": 0}
    result = train(load_config(None, [f"--{k}={v}" for k, v in settings.items()]))
    checkpoint = result.run_dir / "step-000001"
    files = {f.name: mode(f) for f in checkpoint.iterdir()}
    assert "model.safetensors" in files and files == {name: 0o666 & ~umask for name in files}
