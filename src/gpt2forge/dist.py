"""Which process of a launch this is, and the few collectives the package uses: one home for train, eval, HellaSwag
and bench.

A launcher (torchrun, ``accelerate launch``) starts N processes and describes them in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``); accelerate's ``PartialState`` turns that into a process group (gloo on CPUs,
NCCL on GPUs, each process on the GPU of its local rank). Training joins through its ``Accelerator``, evaluation
through ``join``: both through accelerate, so "N processes" means the same thing everywhere. Rank and world size
are the group's once it exists and the launcher's before (an error printed at start-up is printed once), so a
caller never needs to know which. Every helper is a no-op for one process.
"""

from __future__ import annotations

import os

import torch


def group_exists() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if group_exists() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return torch.distributed.get_world_size() if group_exists() else launched_world_size()


def launched_world_size() -> int:
    """How many processes the launcher started (1 without one), whether or not they have formed a group yet."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def join(device: str) -> tuple[str, bool]:
    """Join the launcher's process group through accelerate (``PartialState``) when it started several processes;
    returns this process's device (a GPU: the one of its local rank) and whether a group was formed here (the
    caller may ``leave()`` it). One process: ``device`` as given, no group."""
    if launched_world_size() == 1 or group_exists():
        return device, False
    from accelerate.state import PartialState

    state = PartialState(cpu=torch.device(device).type == "cpu")
    return str(state.device), True


def leave() -> None:
    if group_exists():
        torch.distributed.destroy_process_group()


def broadcast_object(value, src: int = 0):
    """Rank ``src``'s ``value`` on every rank (also a barrier); the value itself for one process."""
    if world_size() == 1 or not group_exists():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over the ranks (``sum``, ``avg`` or ``max``) and return it; untouched for one
    process. A collective: every rank must call it, with the same shape."""
    if group_exists() and torch.distributed.get_world_size() > 1:
        ops = {"sum": torch.distributed.ReduceOp.SUM, "avg": torch.distributed.ReduceOp.AVG,
               "max": torch.distributed.ReduceOp.MAX}
        torch.distributed.all_reduce(tensor, op=ops[op])
    return tensor
