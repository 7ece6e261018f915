"""Bad input and surprising launches: one clear line each, no traceback (the rest of issue 22 and 18's edges)."""

import pytest
import torch
from conftest import HELLASWAG_SAMPLE
from test_faults import QUICK, run_main
from test_train import config, tiny_overrides

from gpt2forge.commands import main
from gpt2forge.train.trainer import train

COMMANDS = {  # each command that takes a device, spelled as it spells it
    "train": lambda data, out, device: ["train", *tiny_overrides(data, out, **QUICK), f"--train.device={device}"],
    "eval": lambda data, out, device: ["eval", "--model", str(out / "none"), "--data", str(data), "--device", device],
    "sample": lambda data, out, device: ["sample", "--model", str(out / "none"), "--device", device],
    "bench": lambda data, out, device: ["bench", "--quick", "--out", str(out), "--device", device],
}
FLAG = {"train": "--train.device", "eval": "--device", "sample": "--device", "bench": "--device"}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps"])
def test_a_device_this_machine_lacks_is_one_line_in_every_command(command, device, data_dir, tmp_path, monkeypatch,
                                                                   capsys):
    if command == "bench" and device == "cuda:3":
        pytest.skip("bench takes a device kind (auto, cpu, cuda, mps), not a GPU index")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    err = run_main(COMMANDS[command](data_dir, tmp_path, device), monkeypatch, capsys)
    what = "MPS (an Apple GPU) is not available here" if device == "mps" else "CUDA is not available here"
    assert f"{FLAG[command]}={device}: {what}" in err and f"use {FLAG[command]}=cpu" in err


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_an_unknown_device_name_is_one_line(command, data_dir, tmp_path, monkeypatch, capsys):
    err = run_main(COMMANDS[command](data_dir, tmp_path, "gpu0"), monkeypatch, capsys)
    assert "--device=gpu0: not a device this program knows; use auto, cpu, cuda, cuda:N or mps" in err


def test_an_unknown_train_device_is_one_line(data_dir, tmp_path, monkeypatch, capsys):
    err = run_main(COMMANDS["train"](data_dir, tmp_path, "gpu0"), monkeypatch, capsys)
    assert "train.device must be auto, cpu, cuda, cuda:N or mps, got 'gpu0'" in err


def test_val_tokens_below_one_sequence_are_refused_and_below_one_batch_noted(data_dir, tmp_path, monkeypatch, capsys):
    err = run_main(["train", *tiny_overrides(data_dir, tmp_path, **{**QUICK, "eval.val_every": 2,
                                                                    "eval.val_tokens": 20})], monkeypatch, capsys)
    assert "--eval.val_tokens=20 is less than one val sequence (train.seq_len=32 tokens): raise it to at least " \
           "32" in err
    assert not (tmp_path / "run").exists()
    result = train(config(data_dir, tmp_path, **{**QUICK, "eval.val_every": 2, "eval.val_tokens": 70}))
    assert "eval.val_tokens=70 is less than one val batch (train.micro_batch_size × train.seq_len = 128 tokens): " \
           "each evaluation scores 64 tokens" in (result.run_dir / "train.log").read_text()
    assert result.val_loss is not None


def offline(monkeypatch, tmp_path):
    from gpt2forge.eval import hellaswag

    def fetch(url, path):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(hellaswag, "_fetch", fetch)
    monkeypatch.setattr(hellaswag, "default_cache_dir", lambda: tmp_path / "cache")


def test_the_offline_hellaswag_advice_names_the_key_of_the_command(data_dir, tmp_path, monkeypatch, capsys):
    offline(monkeypatch, tmp_path)
    err = run_main(["train", *tiny_overrides(data_dir, tmp_path, **{**QUICK, "eval.hellaswag_every": 2})],
                   monkeypatch, capsys)
    assert "offline, pass a local copy of hellaswag_val.jsonl with --eval.hellaswag_file=PATH" in err
    train(config(data_dir, tmp_path / "ok", **QUICK))
    err = run_main(["eval", "--model", str(tmp_path / "ok" / "run"), "--hellaswag", "--device", "cpu"], monkeypatch,
                   capsys)
    assert "offline, pass a local copy of hellaswag_val.jsonl with --hellaswag-file=PATH" in err
    err = run_main(["train", *tiny_overrides(data_dir, tmp_path, **{**QUICK, "eval.hellaswag_every": 2,
                                                                    "eval.hellaswag_file": tmp_path / "no.jsonl"})],
                   monkeypatch, capsys)
    assert "no.jsonl (--eval.hellaswag_file) does not exist" in err
    assert HELLASWAG_SAMPLE.is_file()


def test_a_user_error_under_torchrun_is_printed_by_the_main_rank_only(monkeypatch, capsys):
    args = ["train", "--optim.lr=nan"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 2
    assert capsys.readouterr().err == "gpt2forge train (rank 0): error: optim.lr must be a finite number, got nan\n"


def test_resume_that_finds_nothing_warns_loudly(data_dir, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="gpt2forge.train"):
        result = train(config(data_dir, tmp_path, **QUICK), resume="auto")
    assert min(result.losses) == 1
    assert f"NOTHING TO RESUME: --resume found no checkpoint in {tmp_path / 'run'}, so this launch starts the run " \
           "from step 0" in caplog.text
    assert "NOTHING TO RESUME" in (tmp_path / "run" / "train.log").read_text()


class FakeWandb:
    """Stands in for accelerate's W&B tracker (wandb is not installed here): records how it was started."""

    runs = []
    requires_logging_directory = False

    def __init__(self, project, **kwargs):
        FakeWandb.runs.append(kwargs)

    def start(self):
        pass

    def store_init_configuration(self, config):
        pass

    def log(self, values, step):
        pass

    def finish(self):
        pass


def test_wandb_gets_a_fresh_id_per_run_and_per_restart_and_keeps_it_on_resume(data_dir, tmp_path, monkeypatch):
    from accelerate import tracking

    from gpt2forge.train import metrics

    monkeypatch.setattr(metrics, "check_trackers", lambda names: None)
    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "wandb", FakeWandb)
    FakeWandb.runs = []
    settings = {**QUICK, "log.trackers": "wandb", "optim.decay_steps": 8}
    train(config(data_dir, tmp_path, **settings))
    train(config(data_dir, tmp_path, **{**settings, "train.max_steps": 6}), resume="auto")
    train(config(data_dir, tmp_path, **{**settings, "train.restart": True}))
    train(config(data_dir, tmp_path / "other", **settings))
    first, resumed, restarted, other = FakeWandb.runs
    assert first["name"] == resumed["name"] == restarted["name"] == "run"  # the name is the run directory's
    assert first["id"] == resumed["id"] and first["resume"] == "allow"  # a resume continues the W&B run
    assert restarted["id"] != first["id"] and other["id"] not in (first["id"], restarted["id"])
    assert (tmp_path / "run" / "tracker_id").read_text().strip() == restarted["id"]
