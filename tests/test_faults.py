"""Fault injection: each way a multi-day run can be hurt, and what the user sees. Every case asserts a clear
message (or the right behaviour) and that nothing of the run is lost: checkpoints, metrics, the lock.

Subprocesses only where a process boundary is the point (signals, locks, the CLI's exit code and stderr)."""

import csv
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import after_adamw_update
from test_train import config, metric_losses, tiny_overrides

from gpt2forge import runs
from gpt2forge.commands import main
from gpt2forge.config import load_config
from gpt2forge.errors import UserError
from gpt2forge.models.gpt2 import GPT
from gpt2forge.train import checkpoint as ckpt
from gpt2forge.train.parallelize import launch
from gpt2forge.train.trainer import Trainer, TrainingStopped, train

QUICK = {"eval.val_every": 0, "checkpoint.every": 2, "train.max_steps": 4}  # 4 steps, checkpoints at 2 and 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model trains faster on one thread than on two contended ones (CI machines are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(directory):
    """Every file under ``directory`` with its sha256: 'nothing changed' made checkable."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in (".lock", "train.log")}


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "gpt2forge.cli", *args], capture_output=True, text=True,
                          env=ONE_THREAD, timeout=600, **kwargs)


def assert_clean_error(result, *needles):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def run_main(args, monkeypatch, capsys) -> str:
    """``gpt2forge ARGS`` in this process (no process boundary needed): asserts exit status 2, returns stderr."""
    monkeypatch.setattr(sys, "argv", ["gpt2forge", *args])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpt2forge {args[0]}: error: ") and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------- kills and signals
def wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def test_sigkill_mid_step_loses_only_the_steps_since_the_last_checkpoint(data_dir, tmp_path):
    settings = {"eval.val_every": 0, "checkpoint.every": 2, "train.max_steps": 100000, "optim.decay_steps": 8}
    args = ["train", *tiny_overrides(data_dir, tmp_path, **settings)]
    proc = subprocess.Popen([sys.executable, "-m", "gpt2forge.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    run_dir = tmp_path / "run"
    wait_for(lambda: len(ckpt.complete_checkpoints(run_dir)) >= 2)  # mid-run: the loop is between two steps or in one
    proc.kill()
    proc.wait(timeout=60)
    newest = ckpt.find_resume_checkpoint(run_dir, "auto")  # verified, whatever the kill interrupted
    step = runs.checkpoint_step(newest)
    until = step + 3
    resumed = train(config(data_dir, tmp_path, **{**settings, "train.max_steps": until}), resume="auto")
    assert min(resumed.losses) == step + 1  # continued right after the newest checkpoint
    clean = train(config(data_dir, tmp_path / "clean", **{**settings, "train.max_steps": until}))
    assert resumed.losses == {s: clean.losses[s] for s in resumed.losses}  # bit-identical
    assert metric_losses(run_dir) == metric_losses(clean.run_dir)  # one history: no rows twice, none missing


def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
    args = ["train", *tiny_overrides(data_dir, tmp_path, **{"train.max_steps": 100000, "checkpoint.every": 0,
                                                            "eval.val_every": 0})]
    proc = subprocess.Popen([sys.executable, "-m", "gpt2forge.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ONE_THREAD)
    metrics = tmp_path / "run" / "metrics.csv"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 4)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out and "stopped at step" in out
    saved = ckpt.complete_checkpoints(tmp_path / "run")
    assert len(saved) == 1
    stopped_at = runs.checkpoint_step(saved[0])
    assert stopped_at >= 3 and max(metric_losses(tmp_path / "run")) == stopped_at
    assert (tmp_path / "run" / ".lock").read_text() == ""  # released: the next launch finds no holder


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch
    from gpt2forge.train import checkpoint
    real_save, count = torch.save, [0]
    def save(obj, path, *a, **k):
        count[0] += 1
        if count[0] == 2:  # the second checkpoint: its optimizer.pt is written, then we die mid-save
            real_save(obj, path, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path, *a, **k)
    checkpoint.torch.save = save
    from gpt2forge.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_during_save_leaves_previous_checkpoint_usable(data_dir, tmp_path):
    settings = {"checkpoint.every": 2, "eval.val_every": 0}
    args = ["train", *tiny_overrides(data_dir, tmp_path / "killed", **settings)]
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *args], capture_output=True, text=True,
                            env=ONE_THREAD)
    assert killed.returncode == -signal.SIGKILL
    run_dir = tmp_path / "killed" / "run"
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == ["step-000002"]
    assert (run_dir / "step-000004.tmp").is_dir()  # the half-written one
    assert (run_dir / "latest").read_text().strip() == "step-000002"
    assert json.loads((run_dir / ".lock").read_text())["command"].startswith("gpt2forge train")  # its record stays
    resumed = train(config(data_dir, tmp_path / "killed", **settings), resume="auto")  # the kernel freed the lock
    assert not (run_dir / "step-000004.tmp").exists()
    full = train(config(data_dir, tmp_path / "clean", **settings))
    assert resumed.losses == {s: full.losses[s] for s in range(3, 9)}


# ---------------------------------------------------------------- damaged checkpoints
def damage(checkpoint, how):
    if how == "truncated optimizer.pt":
        path = checkpoint / "optimizer.pt"
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "garbage loader.json":
        (checkpoint / "loader.json").write_text("{not json")
    elif how == "garbage train_state.json":
        (checkpoint / "train_state.json").write_text("\x00\x01garbage")
    elif how == "deleted model.safetensors":
        (checkpoint / "model.safetensors").unlink()
    elif how == "flipped byte in model.safetensors":  # same size: only the hash tells
        path = checkpoint / "model.safetensors"
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "deleted manifest.json":
        (checkpoint / "manifest.json").unlink()


DAMAGES = ["truncated optimizer.pt", "garbage loader.json", "garbage train_state.json", "deleted model.safetensors",
           "flipped byte in model.safetensors", "deleted manifest.json"]
WHY = {"truncated optimizer.pt": "optimizer.pt has 1,000 bytes", "garbage loader.json": "loader.json has 9 bytes",
       "garbage train_state.json": "train_state.json has", "deleted model.safetensors": "model.safetensors is missing",
       "flipped byte in model.safetensors": "model.safetensors does not match its sha256",
       "deleted manifest.json": "no manifest.json"}


@pytest.fixture(scope="module")
def two_checkpoints(data_dir, tmp_path_factory):
    """A run with checkpoints at steps 2 and 4, copied afresh for each test that damages it."""
    out = tmp_path_factory.mktemp("two")
    train(config(data_dir, out, **QUICK))
    return out


@pytest.fixture
def damaged_run(two_checkpoints, tmp_path):
    import shutil

    shutil.copytree(two_checkpoints, tmp_path / "out")
    return tmp_path / "out"


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_newest_checkpoint_is_refused_by_name_and_nothing_changes(data_dir, damaged_run, how):
    run_dir = damaged_run / "run"
    damage(run_dir / "step-000004", how)
    before = snapshot(run_dir)
    with pytest.raises(UserError) as refused:
        train(config(data_dir, damaged_run, **{**QUICK, "train.max_steps": 6}), resume="auto")
    message = str(refused.value)
    assert f"the newest checkpoint of {run_dir}, step-000004, is damaged" in message and WHY[how] in message
    assert f"The newest intact checkpoint is {run_dir / 'step-000002'} (step 2)" in message
    assert f"--resume {run_dir / 'step-000002'}" in message
    with pytest.raises(UserError, match="already has checkpoints"):  # never a silent start from step 0
        train(config(data_dir, damaged_run, **QUICK))
    with pytest.raises(UserError, match="step-000004: the checkpoint is damaged"):
        train(config(data_dir, damaged_run, **QUICK), resume=str(run_dir / "step-000004"))
    assert snapshot(run_dir) == before


def test_resuming_from_the_intact_checkpoint_sets_the_damaged_one_aside(data_dir, damaged_run):
    run_dir = damaged_run / "run"
    damage(run_dir / "step-000004", "truncated optimizer.pt")
    result = train(config(data_dir, damaged_run, **QUICK), resume=str(run_dir / "step-000002"))
    assert min(result.losses) == 3 and result.step == 4
    assert (run_dir / "step-000004.superseded" / "optimizer.pt").stat().st_size == 1000  # kept, not deleted
    assert runs.checkpoint_problems(run_dir / "step-000004") == []  # the new step 4


def test_the_cli_names_the_damaged_checkpoint_and_the_command_to_continue(data_dir, damaged_run, monkeypatch, capsys):
    run_dir = damaged_run / "run"
    damage(run_dir / "step-000004", "garbage loader.json")
    args = ["train", *tiny_overrides(data_dir, damaged_run, **QUICK)]
    err = run_main([*args, "--resume"], monkeypatch, capsys)
    assert "step-000004, is damaged (loader.json has 9 bytes" in err
    assert f"run: gpt2forge {' '.join(args)} --resume {run_dir / 'step-000002'}" in err


@pytest.mark.parametrize("piece, content", [("loader.json", '{"step": 4}'), ("train_state.json", '{"step": "four"}'),
                                            ("train_state.json", "[1, 2]")])
def test_a_damaged_piece_that_matches_its_manifest_is_still_a_clear_error(data_dir, damaged_run, piece, content):
    """A piece rewritten along with its manifest (by hand, or by another tool) is caught when it is read."""
    checkpoint = damaged_run / "run" / "step-000004"
    (checkpoint / piece).write_text(content)
    runs.write_manifest(checkpoint)
    with pytest.raises(UserError) as refused:
        train(config(data_dir, damaged_run, **{**QUICK, "train.max_steps": 6}), resume="auto")
    assert str(checkpoint / piece) in str(refused.value)  # e.g. "… does not hold what this run expects (KeyError …"


def test_a_run_whose_only_checkpoint_is_damaged_is_never_restarted_silently(data_dir, tmp_path):
    train(config(data_dir, tmp_path, **{**QUICK, "train.max_steps": 2}))
    run_dir = tmp_path / "run"
    damage(run_dir / "step-000002", "deleted manifest.json")
    with pytest.raises(UserError, match="already has checkpoints .*incomplete or damaged: step-000002"):
        train(config(data_dir, tmp_path, **QUICK))
    with pytest.raises(UserError, match="No intact checkpoint precedes it.*--train.restart=true"):
        train(config(data_dir, tmp_path, **QUICK), resume="auto")
    with pytest.raises(UserError, match="cannot be combined with --resume"):
        train(config(data_dir, tmp_path, **{**QUICK, "train.restart": True}), resume="auto")
    old_metrics = (run_dir / "metrics.csv").read_text()
    result = train(config(data_dir, tmp_path, **{**QUICK, "train.restart": True}))  # asked for explicitly
    assert result.step == 4 and min(result.losses) == 1
    (previous,) = run_dir.glob("previous-*")
    assert (previous / "step-000002" / "model.safetensors").is_file()  # set aside, not deleted
    assert (previous / "metrics.csv").read_text() == old_metrics
    assert "train.restart=true: the run starts over" in (run_dir / "train.log").read_text()
    assert "restart = true" not in (run_dir / "config.toml").read_text()  # a per-launch switch: saved as false


def test_a_checkpoint_with_non_finite_weights_is_refused(data_dir, damaged_run):
    """Checkpoints written before weights were checked may hold NaNs: resume says so instead of training on."""
    from safetensors.torch import load_file, save_file

    checkpoint = damaged_run / "run" / "step-000004"
    weights = load_file(checkpoint / "model.safetensors")
    from safetensors import safe_open

    with safe_open(checkpoint / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    name = next(iter(weights))
    weights[name][0] = float("nan")
    save_file(weights, checkpoint / "model.safetensors", metadata=metadata)
    runs.write_manifest(checkpoint)
    with pytest.raises(UserError, match="step-000004 holds non-finite weights"):
        train(config(data_dir, damaged_run, **{**QUICK, "train.max_steps": 6}), resume="auto")


# ---------------------------------------------------------------- the lock
def test_a_second_launch_on_a_locked_run_exits_2_naming_the_holder_and_touches_nothing(data_dir, tmp_path):
    settings = {**QUICK, "train.max_steps": 8, "optim.decay_steps": 8}
    train(config(data_dir, tmp_path, **{**settings, "train.max_steps": 4}))
    holder = Trainer(config(data_dir, tmp_path, **settings), resume="auto")  # this process holds the run
    try:
        run_dir = tmp_path / "run"
        before = snapshot(run_dir)
        # a second launch that would die at start-up (its data directory is missing) — it must not get that far
        result = cli(["train", *tiny_overrides(data_dir, tmp_path, **settings), "--resume", "--data.dir=/nonexistent"])
        assert_clean_error(result, f"{run_dir} is in use by another training launch: pid {os.getpid()} on host "
                           f"{socket.gethostname()}")
        assert snapshot(run_dir) == before  # metrics.csv, config.toml, run.json, checkpoints: untouched
        result = holder.run()
    finally:
        holder.close()
    assert result.step == 8 and min(result.losses) == 5
    assert sorted(metric_losses(run_dir)) == list(range(1, 9))
    assert (run_dir / ".lock").read_text() == ""
    train(config(data_dir, tmp_path, **{**settings, "train.max_steps": 10}), resume="auto")  # released: usable again


def test_a_locked_run_refuses_every_rank_under_torchrun(data_dir, tmp_path):
    from test_train import torchrun

    lock = runs.RunLock(tmp_path / "run")
    lock.acquire("the test")
    try:
        with pytest.raises(AssertionError) as failed:  # torchrun exits non-zero: every rank stopped, none hung
            torchrun(["train", *tiny_overrides(data_dir, tmp_path, **QUICK)])
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
    finally:
        lock.release()
    assert "is in use by another training launch" in str(failed.value)
    assert str(failed.value).count("is in use by another training launch") == 1  # said once, not once per rank


def test_lock_records_left_behind(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = {"pid": 999999, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00", "command": "x"}
    (run_dir / ".lock").write_text(json.dumps(record))  # a killed launch on this host: the kernel freed its flock
    lock = runs.RunLock(run_dir)
    assert any("ended without releasing it (killed?)" in w for w in lock.acquire())
    lock.release()
    record["host"] = "elsewhere"  # another host, alive a moment ago: this host cannot tell, so it refuses
    (run_dir / ".lock").write_text(json.dumps(record))
    with pytest.raises(runs.RunLocked, match="a launch on another host: pid 999999 on host elsewhere.*delete"):
        runs.RunLock(run_dir).acquire()
    old = time.time() - runs.LOCK_STALE_S - 60  # silent for longer than the heartbeat allows: presumed dead
    os.utime(run_dir / ".lock", (old, old))
    lock = runs.RunLock(run_dir)
    assert any("presumed dead" in w for w in lock.acquire())
    with pytest.raises(runs.RunLocked, match=f"pid {os.getpid()} on host"):  # and now it is ours
        runs.RunLock(run_dir).acquire()
    lock.release()


# ---------------------------------------------------------------- divergence and spikes
def poison_after(update: int):
    """A patched AdamW step whose ``update``-th call leaves a NaN in the weights (as a huge LR would)."""
    def poison(optimizer):
        optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")

    return after_adamw_update(update, poison)


def test_an_update_that_poisons_the_weights_stops_the_run_and_is_never_saved(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim.AdamW, "step", poison_after(5))
    settings = {**QUICK, "train.max_steps": 8, "checkpoint.keep_last": 1}
    with pytest.raises(TrainingStopped) as stopped:
        train(config(data_dir, tmp_path, **settings))
    run_dir = tmp_path / "run"
    message = str(stopped.value)
    assert message.startswith("step 5: the update left non-finite weights (before it the loss")
    assert "no checkpoint holds them" in message
    assert f"The last healthy checkpoint is {run_dir / 'step-000004'} (step 4)" in message
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == ["step-000004"]  # keep_last=1 kept it
    assert not list(run_dir.glob("step-000006*"))
    monkeypatch.undo()
    resumed = train(config(data_dir, tmp_path, **settings), resume="auto")  # the healthy one trains on
    assert min(resumed.losses) == 5 and all(map(torch.isfinite, torch.tensor(list(resumed.losses.values()))))


def test_a_huge_lr_after_a_healthy_checkpoint_stops_with_the_checkpoint_named(data_dir, tmp_path):
    settings = {**QUICK, "checkpoint.keep_last": 1, "optim.decay_steps": 8}
    train(config(data_dir, tmp_path, **settings))
    with pytest.raises(TrainingStopped) as stopped:
        train(config(data_dir, tmp_path, **{**settings, "train.max_steps": 8, "optim.lr": 1e38, "optim.min_lr": 1e37,
                                            "train.reschedule": True}), resume="auto")
    run_dir = tmp_path / "run"
    assert "step 5: the update left non-finite weights" in str(stopped.value)
    assert f"The last healthy checkpoint is {run_dir / 'step-000004'} (step 4)" in str(stopped.value)
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == ["step-000004"]


def test_a_save_never_writes_non_finite_weights(data_dir, tmp_path):
    trainer = Trainer(config(data_dir, tmp_path, **QUICK))
    try:
        trainer.counters.step = 2
        with torch.no_grad():
            next(trainer.model.parameters()).view(-1)[0] = float("inf")
        with pytest.raises(TrainingStopped, match="non-finite weights"):
            trainer.save_checkpoint()
    finally:
        trainer.close()
    assert runs.step_dirs(tmp_path / "run") == []


REAL_FORWARD = GPT.forward


def scale_loss(steps: set, factor: float, micro_steps: int = 2):
    """A patched forward whose training loss is ``factor`` times the real one on the given optimizer steps."""
    real_forward, calls = REAL_FORWARD, {"n": 0}

    def forward(self, idx, targets=None, cache=None):
        logits, loss = real_forward(self, idx, targets, cache)
        if targets is not None and torch.is_grad_enabled():
            calls["n"] += 1
            if (calls["n"] - 1) // micro_steps + 1 in steps:
                loss = loss * factor
        return logits, loss

    return forward


SPIKY = {"eval.val_every": 0, "checkpoint.every": 0, "train.max_steps": 12, "train.spike_zscore": 4,
         "train.spike_window": 6, "train.spike_min_history": 4, "optim.decay_steps": 12}


def test_a_loss_spike_is_skipped_logged_and_resumes_exactly(data_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(GPT, "forward", scale_loss({9}, 3.0))
    updates = []
    real_step = torch.optim.AdamW.step

    def counted_step(self, *args, **kwargs):
        updates.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted_step)
    with caplog.at_level("WARNING", logger="gpt2forge.train"):
        full = train(config(data_dir, tmp_path / "full", **SPIKY))
    assert len(updates) == 11  # 12 steps, one skipped
    assert "step 9: loss" in caplog.text and "is a spike" in caplog.text
    assert "step skipped, weights unchanged" in caplog.text
    assert full.losses[10] < full.losses[9] / 2  # the next step is back to normal
    # stopped at step 7 and resumed: the window comes back from the checkpoint, so step 9 is skipped again
    monkeypatch.setattr(GPT, "forward", scale_loss({9}, 3.0))
    train(config(data_dir, tmp_path / "split", **{**SPIKY, "train.max_steps": 7}))
    state = json.loads((tmp_path / "split" / "run" / "step-000007" / "guard.json").read_text())
    assert len(state["loss_window"]) == 6
    monkeypatch.setattr(GPT, "forward", scale_loss({2}, 3.0))  # the resumed launch counts its steps from 8
    resumed = train(config(data_dir, tmp_path / "split", **SPIKY), resume="auto")
    assert resumed.losses == {s: full.losses[s] for s in range(8, 13)}


def test_loss_spikes_in_a_row_count_toward_max_bad_steps(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(GPT, "forward", scale_loss({7, 8, 9}, 5.0))
    with pytest.raises(TrainingStopped, match="3 consecutive steps were skipped.* loss spike \\(first: step 7, last: "
                                              "step 9: loss .* is a spike.*None of them reached the weights.*"
                                              "train.spike_\\*; 0 = off"):
        train(config(data_dir, tmp_path, **{**SPIKY, "train.max_bad_steps": 3}))


def test_the_zscore_rule_waits_for_its_history_the_absolute_rules_do_not(data_dir, tmp_path, monkeypatch):
    """A 1.5× rise at step 3 is no spike for the absolute rules and too early for the z-score; a 10× one at step 1
    (no history at all) is skipped by the margin rule."""
    monkeypatch.setattr(GPT, "forward", scale_loss({3}, 1.5))
    result = train(config(data_dir, tmp_path / "a", **{**SPIKY, "train.max_steps": 4}))
    assert result.losses[3] > 1.3 * result.losses[2]
    state = json.loads((tmp_path / "a" / "run" / "step-000004" / "guard.json").read_text())
    assert state["bad_steps"] == 0 and len(state["loss_window"]) == 4
    monkeypatch.setattr(GPT, "forward", scale_loss({1}, 10.0))
    train(config(data_dir, tmp_path / "b", **{**SPIKY, "train.max_steps": 8}))
    state = json.loads((tmp_path / "b" / "run" / "step-000008" / "guard.json").read_text())
    assert state["last_bad_step"] == 1 and "above ln(vocab)" in state["last_reason"]  # step 1 was skipped
    assert state["bad_steps"] == 0 and len(state["loss_window"]) == 6  # steps 2-8 applied (the window keeps 6)


# ---------------------------------------------------------------- the filesystem
def test_an_out_dir_that_is_a_file_is_a_clear_error(data_dir, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("not a directory")
    err = run_main(["train", *tiny_overrides(data_dir, blocker, **QUICK)], monkeypatch, capsys)
    assert f"cannot use the run directory {blocker / 'run'}: Not a directory; a part of that path is a file" in err
    assert blocker.read_text() == "not a directory"


def test_an_unwritable_out_dir_is_a_clear_error(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "readonly"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o500)
        expected, undo = "Permission denied; make it writable", ["chmod", "700", str(out)]
    else:  # root writes through chmod 0500; a read-only filesystem stops it
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(out)], capture_output=True)
        if mounted.returncode != 0:
            pytest.skip(f"running as root, which writes through chmod 0500, and cannot mount a read-only tmpfs here "
                        f"({mounted.stderr.decode().strip()}); the path-under-a-file case covers the message")
        expected, undo = "Read-only file system; choose a location on a writable filesystem", ["umount", "-l", str(out)]
    try:
        err = run_main(["train", *tiny_overrides(data_dir, out, **QUICK)], monkeypatch, capsys)
    finally:
        subprocess.run(undo, check=False)
    assert f"cannot use the run directory {out / 'run'}: {expected}" in err


def test_a_full_disk_during_a_save_stops_the_run_and_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    real_save, calls = torch.save, {"n": 0}

    def save(obj, path, *args, **kwargs):  # the second checkpoint's optimizer.pt meets a full disk
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)
    with pytest.raises(TrainingStopped) as stopped:
        train(config(data_dir, tmp_path, **{**QUICK, "train.max_steps": 8}))
    run_dir = tmp_path / "run"
    message = str(stopped.value)
    assert f"could not save checkpoint {run_dir / 'step-000004'} (while writing optimizer.pt)" in message
    assert "No space left on device; free space there" in message
    assert "The run stopped at step 4 rather than train on without checkpoints" in message
    assert f"the newest checkpoint, {run_dir / 'step-000002'} (step 2), is intact" in message
    assert runs.step_dirs(run_dir) == [run_dir / "step-000002"] and not list(run_dir.glob("*.tmp"))
    assert runs.checkpoint_problems(run_dir / "step-000002") == []
    assert (run_dir / "latest").read_text().strip() == "step-000002"


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 900 KiB tmpfs (room for one checkpoint of the tiny model, not two), where mounting is allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root; the monkeypatched ENOSPC test covers the logic")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the monkeypatched ENOSPC test "
                    "covers the logic")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_during_a_save(data_dir, tiny_filesystem):
    with pytest.raises(TrainingStopped) as stopped:
        train(config(data_dir, tiny_filesystem, **{**QUICK, "train.max_steps": 8, "checkpoint.keep_last": 1}))
    run_dir = tiny_filesystem / "run"
    assert "could not save checkpoint" in str(stopped.value) and "is intact" in str(stopped.value)
    assert runs.step_dirs(run_dir) == [run_dir / "step-000002"] and not list(run_dir.glob("*.tmp"))
    assert runs.checkpoint_problems(run_dir / "step-000002") == []


def test_a_full_disk_while_logging_stops_the_run_with_a_message(data_dir, tmp_path, monkeypatch):
    from gpt2forge.train.metrics import MetricsLogger

    real_log = MetricsLogger.log

    def log(self, row):
        if row.get("step") == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_log(self, row)

    monkeypatch.setattr(MetricsLogger, "log", log)
    with pytest.raises(TrainingStopped, match="cannot write the run's logs: .*metrics.csv: No space left on device.*"
                                              "stopped at step 3 without saving.*step-000002 \\(step 2\\), is intact"):
        train(config(data_dir, tmp_path, **{**QUICK, "train.max_steps": 8}))


def test_main_turns_an_escaped_filesystem_error_into_a_message(monkeypatch, capsys):
    from gpt2forge.commands import report

    def run(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/where/report.png")

    monkeypatch.setattr(report, "run", run)
    assert main(["report", "somewhere"]) == 2
    assert capsys.readouterr().err.strip() == (
        "gpt2forge report: error: /some/where/report.png: Permission denied; make it writable (or readable) for this "
        "user, or choose another location")

    def unrelated(args):
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    monkeypatch.setattr(report, "run", unrelated)
    with pytest.raises(ConnectionRefusedError):  # not a filesystem error: not ours to explain
        main(["report", "somewhere"])


# ---------------------------------------------------------------- resume-time surprises
def test_a_resume_that_would_change_the_lr_schedule_is_refused_unless_asked(data_dir, tmp_path, caplog):
    follows_max = {**QUICK, "optim.decay_steps": "none"}  # the cosine decay ends at train.max_steps
    train(config(data_dir, tmp_path, **follows_max))
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    with pytest.raises(UserError) as refused:
        train(config(data_dir, tmp_path, **{**follows_max, "train.max_steps": 12}), resume="auto")
    message = str(refused.value)
    assert "started with another LR schedule: train.max_steps 4 → 12 (optim.decay_steps is unset" in message
    assert "the LR of step 5 would be" in message and "--optim.decay_steps=4" in message
    assert "--train.reschedule=true" in message
    with pytest.raises(UserError, match="optim.min_lr 0.001 → 0.0005.* the LR of step 5 would be 0.0005 instead of "
                                        "0.001"):
        train(config(data_dir, tmp_path, **{**follows_max, "optim.min_lr": 5e-4, "train.max_steps": 6,
                                            "optim.decay_steps": 4}), resume="auto")
    assert snapshot(run_dir) == before
    pinned = train(config(data_dir, tmp_path, **{**follows_max, "train.max_steps": 6, "optim.decay_steps": 4}),
                   resume="auto")  # more steps at the schedule's final LR: the LR of the coming steps is unchanged
    assert pinned.step == 6
    with caplog.at_level("WARNING", logger="gpt2forge.train"):
        extended = train(config(data_dir, tmp_path, **{**follows_max, "train.max_steps": 12, "train.reschedule": True}),
                         resume="auto")
    assert extended.step == 12 and "train.reschedule=true: the LR schedule changes" in caplog.text
    assert json.loads((run_dir / "step-000012" / "train_state.json").read_text())["schedule"]["max_steps"] == 12
    assert "reschedule = true" not in (run_dir / "step-000012" / "config.toml").read_text()


def test_a_checkpoint_from_before_stored_schedules_is_checked_against_its_config(data_dir, damaged_run):
    checkpoint = damaged_run / "run" / "step-000004"
    state = json.loads((checkpoint / "train_state.json").read_text())
    del state["schedule"]
    (checkpoint / "train_state.json").write_text(json.dumps(state))
    runs.write_manifest(checkpoint)
    with pytest.raises(UserError, match="another LR schedule: train.max_steps 4 → 6, optim.lr 0.01 → 0.02"):
        train(config(data_dir, damaged_run, **{**QUICK, "train.max_steps": 6, "optim.lr": 0.02}), resume="auto")


def test_a_finished_run_resumed_with_fewer_steps_is_an_error(data_dir, two_checkpoints, tmp_path):
    import shutil

    shutil.copytree(two_checkpoints, tmp_path / "out")
    with pytest.raises(UserError, match="the checkpoint is at step 4, past train.max_steps=2"):
        train(config(data_dir, tmp_path / "out", **{**QUICK, "train.max_steps": 2}), resume="auto")
    again = train(config(data_dir, tmp_path / "out", **QUICK), resume="auto")  # the same length: done, nothing to do
    assert again.step == 4 and again.losses == {}


# ---------------------------------------------------------------- bad settings
@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.min_lr=inf", "optim.grad_clip=nan",
                                      "optim.weight_decay=-inf", "optim.beta2=nan", "train.spike_zscore=nan"])
def test_a_non_finite_setting_is_refused(override):
    with pytest.raises(UserError, match=f"{override.split('=')[0]} must be a finite number"):
        load_config(None, [f"--{override}"])


def test_a_nan_learning_rate_on_the_command_line_exits_2(data_dir, tmp_path, monkeypatch, capsys):
    err = run_main(["train", *tiny_overrides(data_dir, tmp_path, **{"optim.lr": "nan"})], monkeypatch, capsys)
    assert "optim.lr must be a finite number, got nan" in err
    assert not (tmp_path / "run").exists()


def test_a_device_that_is_not_there_is_named_before_anything_starts(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--train.device=cuda: CUDA is not available here.*--train.device=cpu"):
        train(config(data_dir, tmp_path, **{**QUICK, "train.device": "cuda"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = config(data_dir, tmp_path, **{**QUICK, "train.device": "cuda:7"})
    with pytest.raises(UserError, match="--train.device=cuda:7: this machine has 1 CUDA device\\(s\\), cuda:0 to "
                                        "cuda:0"):
        launch(cfg.train)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = config(data_dir, tmp_path, **{**QUICK, "train.device": "cuda:0"})
    with pytest.raises(UserError, match="each process takes the GPU of its local rank"):
        launch(cfg.train)
    assert not (tmp_path / "run").exists()


def test_metrics_keep_one_row_per_step_after_resumes(data_dir, tmp_path):
    """Resumes and refused launches never duplicate or drop metrics rows (the report reads them)."""
    settings = {**QUICK, "train.max_steps": 6, "optim.decay_steps": 8}
    train(config(data_dir, tmp_path, **{**settings, "train.max_steps": 4}))
    with pytest.raises(UserError):
        train(config(data_dir, tmp_path, **settings))
    train(config(data_dir, tmp_path, **settings), resume="auto")
    with open(tmp_path / "run" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]
