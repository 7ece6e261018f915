"""``gpt2forge eval`` merges into ``eval.json``: an eval of the val loss alone keeps an earlier HellaSwag score
(and the other way round), each result saying when and how it was computed; results of another model are replaced,
not mixed in."""

import json

import numpy as np
from conftest import HELLASWAG_SAMPLE

from gpt2forge.commands import main
from gpt2forge.data.shards import write_shard
from gpt2forge.weights import save_model


def checkpoint_of(tmp_path, model):
    directory = tmp_path / "run" / "step-000007"
    save_model(model, directory)
    (directory / "train_state.json").write_text(json.dumps({"step": 7, "tokens": 7168}))
    (tmp_path / "run" / "latest").write_text("step-000007\n")
    return directory


def val_dir(path):
    path.mkdir()
    write_shard(path / "toy_val_000000.bin", np.random.default_rng(0).integers(0, 50257, 700, dtype=np.uint16))
    return path


def test_a_val_only_eval_keeps_the_earlier_hellaswag(tmp_path, tiny_model, capsys):
    checkpoint = checkpoint_of(tmp_path, tiny_model)
    hellaswag = ["--hellaswag-file", str(HELLASWAG_SAMPLE), "--hellaswag-limit", "4", "--no-progress"]
    assert main(["eval", "--model", str(tmp_path / "run"), *hellaswag]) == 0
    first = json.loads((checkpoint / "eval.json").read_text())
    assert first["hellaswag"]["n"] == 4 and "val" not in first

    data = val_dir(tmp_path / "data")  # the same checkpoint named by its step directory this time
    assert main(["eval", "--model", str(checkpoint), "--data", str(data), "--batch-size", "2", "--no-progress",
                 "--precision", "bf16"]) == 0
    assert "kept from an earlier eval: hellaswag" in capsys.readouterr().out
    merged = json.loads((checkpoint / "eval.json").read_text())
    assert merged["hellaswag"] == first["hellaswag"] and merged["val"]["tokens"] == 640
    assert merged["evaluated"]["hellaswag"] == first["evaluated"]["hellaswag"]
    assert merged["evaluated"]["hellaswag"]["precision"] == "fp32"
    assert merged["evaluated"]["val"]["precision"] == "bf16" and merged["precision"] == "bf16"

    # a new HellaSwag replaces the old one and keeps the val loss
    assert main(["eval", "--model", str(checkpoint), *hellaswag[:3], "6", "--no-progress"]) == 0
    again = json.loads((checkpoint / "eval.json").read_text())
    assert again["hellaswag"]["n"] == 6 and again["val"] == merged["val"]
    assert set(again["evaluated"]) == {"val", "hellaswag"}


def test_results_of_another_model_are_replaced_not_mixed(tmp_path, tiny_model, hf_model_dir, capsys):
    checkpoint_of(tmp_path, tiny_model)
    out = tmp_path / "results.json"
    hellaswag = ["--hellaswag-file", str(HELLASWAG_SAMPLE), "--hellaswag-limit", "2", "--no-progress",
                 "--out", str(out)]
    assert main(["eval", "--model", str(tmp_path / "run"), *hellaswag]) == 0
    data = val_dir(tmp_path / "data")
    assert main(["eval", "--model", str(hf_model_dir), "--data", str(data), "--batch-size", "2", "--no-progress",
                 "--out", str(out)]) == 0
    assert "kept from" not in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["model"] == str(hf_model_dir) and "hellaswag" not in saved and set(saved["evaluated"]) == {"val"}
