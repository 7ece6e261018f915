"""SLURM: the sbatch template's torchrun line is one torch's own parser accepts, and ``gpt2forge train`` started by
srun without torchrun forms one process group (or refuses on every task): never one rank training alone."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_train import metric_losses, tiny_overrides, torchrun

from gpt2forge.errors import UserError
from gpt2forge.train.slurm import PORT_BASE, adopt_slurm_task, first_host, tasks_on_node

TEMPLATE = Path(__file__).resolve().parents[1] / "examples" / "slurm" / "train.sbatch"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def stub(path: Path, body: str) -> None:
    path.write_text(textwrap.dedent(body).lstrip())
    path.chmod(0o755)


def test_sbatch_template_starts_one_torchrun_per_node_that_torch_accepts(tmp_path, monkeypatch):
    """The template run by bash with stand-ins for scontrol, srun and torchrun; the arguments torchrun got are then
    parsed by torch.distributed.run's own parser and turned into its launch config."""
    from torch.distributed.run import config_from_args, get_args_parser

    from gpt2forge.commands import build_parser

    bin_dir, record = tmp_path / "bin", tmp_path / "torchrun.json"
    bin_dir.mkdir()
    stub(bin_dir / "scontrol", """
        #!/bin/sh
        [ "$1 $2 $3" = "show hostnames gpu-a[017-018]" ] && printf 'gpu-a017\\ngpu-a018\\n'
        """)
    stub(bin_dir / "srun", f"""
        #!/bin/sh
        echo "$@" > {tmp_path / "srun.txt"}
        while [ "${{1#--}}" != "$1" ]; do shift; done
        exec "$@"
        """)
    stub(bin_dir / "torchrun", f"""
        #!{sys.executable}
        import json, sys
        json.dump(sys.argv[1:], open({str(record)!r}, "w"))
        """)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "gpu-a[017-018]", "SLURM_GPUS_ON_NODE": "8"}
    result = subprocess.run(["bash", str(TEMPLATE), "--config", "gpt2-124m-fineweb-edu-10b", "--optim.lr=3e-4"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--ntasks-per-node=1" in (tmp_path / "srun.txt").read_text()  # one torchrun per node

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # (config_from_args sets it otherwise)
    args = get_args_parser().parse_args(json.loads(record.read_text()))
    config, cmd, cmd_args = config_from_args(args)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 8)
    assert config.rdzv_backend == "c10d" and config.rdzv_endpoint == "gpu-a017:29500" and config.run_id == "4242"
    assert args.module and args.training_script == "gpt2forge.cli"
    train_args = cmd_args[cmd_args.index("gpt2forge.cli") + 1:]
    assert train_args[0] == "train"
    parsed, overrides = build_parser("train").parse_known_args(train_args[1:])
    assert parsed.resume == "auto" and parsed.config == "gpt2-124m-fineweb-edu-10b" and overrides == ["--optim.lr=3e-4"]


def test_first_host_of_a_slurm_node_list():
    assert first_host("gpu[003-004,009],cpu1") == "gpu003"
    assert first_host("cpu1,gpu[003-004]") == "cpu1"
    assert first_host("r[1-2]-n[07-08]") == "r1-n07"
    assert first_host("node-17") == "node-17"
    with pytest.raises(UserError, match="MASTER_ADDR"):
        first_host("gpu[003")
    assert tasks_on_node("4(x2),3", 2) == 3 and tasks_on_node("8", 0) == 8 and tasks_on_node("8", 1) is None


def srun_env(rank: int, tasks: int = 2, **extra) -> dict[str, str]:
    return {"SLURM_JOB_ID": "31337", "SLURM_NTASKS": str(tasks), "SLURM_STEP_NUM_TASKS": str(tasks),
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 4), "SLURM_NODEID": str(rank // 4),
            "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", **extra}


def test_srun_task_variables_become_torch_distributed_ones():
    env = srun_env(5, tasks=8)
    assert adopt_slurm_task(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                                     "MASTER_ADDR": "gpu003", "MASTER_PORT": str(PORT_BASE + 1337)}
    assert env["RANK"] == "5" and env["MASTER_ADDR"] == "gpu003"
    # a task bound to one GPU (--gpus-per-task=1) sees it as cuda:0; MASTER_* exported by the job script are kept
    env = srun_env(5, tasks=8, CUDA_VISIBLE_DEVICES="1", MASTER_ADDR="10.0.0.3", MASTER_PORT="12345")
    assert adopt_slurm_task(env)["LOCAL_RANK"] == "0" and (env["MASTER_ADDR"], env["MASTER_PORT"]) == (
        "10.0.0.3", "12345")
    # a launcher (torchrun inside srun, as the sbatch template does) or a one-task step: nothing changes
    for env in ({**srun_env(1), "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}, srun_env(0, tasks=1), {}):
        before = dict(env)
        assert adopt_slurm_task(env) == {} and env == before


def test_missing_slurm_variables_are_refused_in_one_line():
    env = srun_env(1)
    del env["SLURM_PROCID"]
    with pytest.raises(UserError, match=r"srun started 2 tasks .* SLURM_PROCID is unset .*torchrun") as error:
        adopt_slurm_task(env)
    assert "\n" not in str(error.value)
    batch_script = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "0"}  # no srun step
    with pytest.raises(UserError, match=r"SLURM_NTASKS=16.*not one of an srun step.*train alone"):
        adopt_slurm_task(batch_script)


def free_port_for_job() -> int:
    """A SLURM_JOB_ID whose derived MASTER_PORT is free right now."""
    for job in range(os.getpid() % 5000, 10000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", PORT_BASE + job))
            except OSError:
                continue
            return job
    raise RuntimeError("no free port")


def srun_like(args: list[str], envs: list[dict[str, str]]) -> list[subprocess.CompletedProcess]:
    """``srun``'s part: the same command once per task, each with its SLURM variables and no launcher's."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    procs = [subprocess.Popen([sys.executable, "-m", "gpt2forge.cli", *args], env={**base, "OMP_NUM_THREADS": "1",
                                                                                  **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in envs]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_srun_without_torchrun_trains_as_one_two_rank_group(data_dir, tmp_path):
    """Two tasks started as srun starts them (SLURM_* only): one 2-rank gloo group with torchrun's losses."""
    overrides = {"train.max_steps": 3, "eval.val_every": 0, "checkpoint.every": 0}
    torchrun(["train", *tiny_overrides(data_dir, tmp_path / "torchrun", **overrides)])
    job = str(free_port_for_job())
    results = srun_like(["train", *tiny_overrides(data_dir, tmp_path / "srun", **overrides)],
                        [srun_env(r, SLURM_JOB_ID=job, SLURM_STEP_NODELIST="localhost",
                                  SLURM_STEP_TASKS_PER_NODE="2") for r in range(2)])
    for r in results:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    log = results[0].stdout
    assert "2 rank(s)" in log and "form the process group from SLURM's variables" in log
    assert metric_losses(tmp_path / "srun" / "run") == metric_losses(tmp_path / "torchrun" / "run")
    assert len(metric_losses(tmp_path / "srun" / "run")) == 3


def test_several_tasks_without_an_srun_step_refuse_on_every_task(data_dir, tmp_path):
    """SLURM_NTASKS=2 but no step variables (``gpt2forge train`` in the batch script, or a hand-made environment):
    every process exits with the message, none trains."""
    envs = [{"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}
            for r in range(2)]
    results = srun_like(["train", *tiny_overrides(data_dir, tmp_path)], envs)
    for r in results:
        assert r.returncode == 2 and "not one of an srun step" in r.stderr and "torchrun" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
