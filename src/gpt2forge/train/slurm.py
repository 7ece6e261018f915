"""``srun gpt2forge train ...`` without torchrun: the tasks of the SLURM step form the process group themselves.

torchrun, ``accelerate launch`` and ``torch.distributed`` find their peers through RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. ``srun`` sets none of them, only its own task variables; without a translation
every task would see a world of one, train alone as rank 0, and all but one would stop on the run lock.
``adopt_slurm_task`` translates, before accelerate initialises the group:

- RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS (the tasks of *this* srun step, which may be fewer than
  the job's SLURM_NTASKS), LOCAL_RANK = SLURM_LOCALID (0 when the task sees a single GPU, as with
  ``--gpus-per-task=1``: its GPU is then cuda:0), LOCAL_WORLD_SIZE from SLURM_STEP_TASKS_PER_NODE.
- MASTER_ADDR = the first host of SLURM_STEP_NODELIST, where srun places task 0 (not SLURM_LAUNCH_NODE_IPADDR:
  an ``srun`` typed in a ``salloc`` shell on a login node would name the login node, which runs no task).
  MASTER_PORT = 20000 + SLURM_JOB_ID mod 10000: the same in every task, below Linux's ephemeral ports, and
  different for jobs that share a node. Either can be set beforehand (exported in the job script) and is kept.

A launcher's variables win: under torchrun (one per node, ``examples/slurm/train.sbatch``) nothing changes. A
SLURM job with several tasks where the step's variables are missing — ``gpt2forge train`` typed into the batch
script or a ``salloc`` shell, which is one process however many tasks the job has — is refused in one line with
the commands that work, rather than leaving one rank training alone or the others waiting for peers.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import MutableMapping

from ..errors import UserError

log = logging.getLogger("gpt2forge.train")

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
PORT_BASE, PORT_SPAN = 20000, 10000
HOW_TO_LAUNCH = ("start one task per GPU with `srun --ntasks-per-node=GPUS gpt2forge train ...`, or one torchrun per "
                 "node with examples/slurm/train.sbatch (`srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES "
                 "--nproc_per_node=GPUS --rdzv_backend=c10d --rdzv_endpoint=HEAD:29500 -m gpt2forge.cli train ...`)")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist (``gpu[003-004,009],cpu1`` → ``gpu003``; ``r[1-2]-n[07-08]`` → ``r1-n07``):
    what ``scontrol show hostnames LIST | head -n 1`` prints, without needing scontrol."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end].strip())
    if not host or any(c in host for c in "[],"):
        raise UserError(f"cannot read the first host of the SLURM node list {nodelist!r} (SLURM_STEP_NODELIST); "
                        "export MASTER_ADDR=<the host of task 0> and relaunch")
    return host


def tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
    """Tasks on node ``node_id`` from SLURM's ``2(x3),1`` notation (None when unreadable)."""
    counts = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


def adopt_slurm_task(env: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the ``torch.distributed`` variables from an srun step's, in ``env``; return what was set ({} when this
    is not a multi-task srun step, or a launcher already set them). Raises ``UserError`` for a SLURM job with
    several tasks whose step variables are missing: such a process cannot find its peers."""
    if any(name in env for name in LAUNCHER_VARS):
        return {}
    step_tasks, job_tasks = env.get("SLURM_STEP_NUM_TASKS"), env.get("SLURM_NTASKS")
    if step_tasks is None:
        if job_tasks is not None and job_tasks.isdigit() and int(job_tasks) > 1:
            raise UserError(
                f"this SLURM job has {job_tasks} tasks (SLURM_NTASKS={job_tasks}) but this process is not one of an "
                "srun step (SLURM_STEP_NUM_TASKS is unset: the batch script or a salloc shell runs one process), so "
                f"it would train alone; {HOW_TO_LAUNCH}"
            )
        return {}
    if not step_tasks.isdigit() or int(step_tasks) <= 1:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    needed = {"SLURM_PROCID": env.get("SLURM_PROCID", ""), "SLURM_LOCALID": env.get("SLURM_LOCALID", "")}
    if "MASTER_PORT" not in env:
        needed["SLURM_JOB_ID"] = env.get("SLURM_JOB_ID", "")
    missing = [name for name, value in needed.items() if not value.isdigit()]
    if nodelist is None and "MASTER_ADDR" not in env:
        missing.append("SLURM_STEP_NODELIST")
    if missing:
        raise UserError(f"srun started {step_tasks} tasks (SLURM_STEP_NUM_TASKS={step_tasks}) but "
                        f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} unset (or not a number), so "
                        f"they cannot form one process group; {HOW_TO_LAUNCH}")
    local_rank = env["SLURM_LOCALID"]
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) == 1:  # srun bound one GPU to this task: it is this process's cuda:0
        local_rank = "0"
    chosen = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": step_tasks, "LOCAL_RANK": local_rank,
              "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
              "MASTER_PORT": env.get("MASTER_PORT") or str(PORT_BASE + int(env["SLURM_JOB_ID"]) % PORT_SPAN)}
    node_id = env.get("SLURM_NODEID", "")
    local = tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""), int(node_id)) if node_id.isdigit() else None
    if local is not None:
        chosen["LOCAL_WORLD_SIZE"] = str(local)
    env.update(chosen)
    if chosen["RANK"] == "0":
        log.info("srun without a launcher: %s tasks form the process group from SLURM's variables (task 0 at %s:%s)",
                 step_tasks, chosen["MASTER_ADDR"], chosen["MASTER_PORT"])
    return chosen
