"""How the model is spread over processes: the process group (via accelerate), DDP or FSDP2, and compile.

DDP and FSDP are PyTorch's own, set up here: DDP without buffer broadcasts and with gradients as views of its
buckets; FSDP2 (``fully_shard`` per block, then the rest), not accelerate's FSDP plugin, which refuses to run
without an accelerator and so could not be tested on CPUs. Precision and compile are ours too: accelerate is told
to add neither, so an ``accelerate config`` default can never add a second autocast behind our back.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dist
from ..config import TrainSection
from ..device import autocast_dtype, pick_device, resolve_device
from ..errors import UserError
from ..files import explain
from .slurm import adopt_slurm_task

log = logging.getLogger("gpt2forge.train")


@dataclass
class Parallel:
    """The process group's view from this process, and the model as each code path needs it."""

    accelerator: object
    device: torch.device
    rank: int
    world_size: int
    fsdp: bool
    compile: bool = False  # FSDP compiles block by block, before sharding (``wrap``); ``compiled`` then does nothing
    param_dtype: torch.dtype | None = None  # FSDP's compute dtype for parameters (bf16 runs), None = as stored

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP or FSDP2 around ``model`` in a process group (a 1-process one too, as under ``torchrun
        --nproc_per_node=1``); the model itself without one."""
        if self.fsdp:
            return self.shard(model)
        if not torch.distributed.is_initialized():
            return model
        from torch.nn.parallel import DistributedDataParallel

        # no buffer broadcast before every forward (the models' buffers never change; torch ≥ 2.13 names that
        # switch forward_sync_buffers); gradients live in the all-reduce buckets (no second copy of them); the
        # device is the process's own GPU (CPUs: none)
        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        log.info("DDP over %d rank(s) (%s)", self.world_size, torch.distributed.get_backend())
        return DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True, **{"forward_sync_buffers" if newer else "broadcast_buffers": False},
        )

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2: each block compiled (when asked) and then sharded on its own, then the rest of the model. A bf16
        run gathers parameters in bf16 and reduces gradients in fp32 (``fsdp_policy``)."""
        from torch.distributed.fsdp import fully_shard

        # the logits are a slice (view) when the vocab is padded; nothing modifies them in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        policy = fsdp_policy(self.param_dtype)
        for block in model.blocks:
            if self.compile:
                block.compile()  # in place: parameter names (and checkpoints) stay those of the eager model
            fully_shard(block, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)

    @contextlib.contextmanager
    def gradient_sync(self, wrapped: torch.nn.Module, sync: bool):
        """Skip the gradient all-reduce on accumulation micro-steps: only the last one of a step syncs."""
        if sync or self.world_size == 1:
            yield
        elif self.fsdp:
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)
        else:
            with wrapped.no_sync():
                yield


def start(train: TrainSection) -> Parallel:
    """Join the process group the launcher (torchrun, accelerate launch, srun, or none) describes, on any device.

    The device is resolved first: accelerate forms a CPU process group only when told the run is on the CPU,
    and without that N launched processes would each train alone, as rank 0, into the same run directory.
    """
    from accelerate import Accelerator

    adopt_slurm_task()  # srun without torchrun: RANK, WORLD_SIZE, ... from SLURM's variables (or a refusal)
    refuse_single_process_accelerate_launch()
    device = pick_device(train.device)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if train.distributed == "fsdp" and launched > 1:
        refuse_fsdp_without_fully_shard(torch.__version__)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="no", dynamo_backend="no")
    world_size = accelerator.num_processes
    if world_size != launched:
        raise UserError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but they formed a process group of "
            f"{world_size} on {accelerator.device}; set --train.device explicitly (cpu or cuda) and relaunch"
        )
    if world_size == 1 and accelerator.device.type == "cuda" and torch.cuda.device_count() > 1:
        log.warning("one process on a host with %d GPUs: only one is used; launch with torchrun "
                    "--nproc_per_node=%d (or accelerate launch --multi_gpu) to use them all",
                    torch.cuda.device_count(), torch.cuda.device_count())
    return Parallel(accelerator, accelerator.device, accelerator.process_index, world_size,
                    fsdp=train.distributed == "fsdp" and world_size > 1, compile=train.compile,
                    param_dtype=autocast_dtype(train.precision, accelerator.device))


def refuse_fsdp_without_fully_shard(version: str) -> None:
    """FSDP2's ``fully_shard`` is public from torch 2.6; older versions would fail deep in ``wrap`` instead."""
    major, minor = (int(part) for part in re.findall(r"\d+", version)[:2])
    if (major, minor) < (2, 6):
        raise UserError(f"train.distributed=fsdp needs torch ≥ 2.6 (FSDP2's fully_shard); this is torch {version}. "
                        "Upgrade torch, or use --train.distributed=ddp")


def refuse_single_process_accelerate_launch() -> None:
    """``accelerate launch --cpu --num_processes N`` (without ``--multi_gpu``) starts ONE process, silently. Its
    command line is our parent's: read it (Linux) and say what to do instead of training alone."""
    if "WORLD_SIZE" in os.environ or not any(k.startswith("ACCELERATE_") for k in os.environ):
        return
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return
    if "launch" not in parent or not any(a.endswith("accelerate") or "accelerate" in a for a in parent[:3]):
        return
    for i, arg in enumerate(parent):
        value = arg.split("=", 1)[1] if arg.startswith(("--num_processes=", "--num-processes=")) else (
            parent[i + 1] if arg in ("--num_processes", "--num-processes") and i + 1 < len(parent) else None)
        if value is not None and value.isdigit() and int(value) > 1:
            raise UserError(
                f"`accelerate launch` was asked for {value} processes but started one (its --cpu launcher without "
                "--multi_gpu runs a single process); relaunch with `accelerate launch --multi_gpu --cpu "
                f"--num_processes {value} ...` (works on CPUs too) or `torchrun --nproc_per_node={value} ...`"
            )


def fsdp_policy(param_dtype: torch.dtype | None):
    """FSDP2's mixed precision: parameters gathered in ``param_dtype`` (bf16 halves the all-gathers) and gradients
    reduced in fp32 (a sum of bf16 gradients over many ranks loses bits); the default policy without one."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def compiled(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(model)`` when enabled; an FSDP model as it is (its blocks were compiled before sharding).
    The uncompiled handle stays the caller's: weights, sampling, export."""
    from torch.distributed.fsdp import FSDPModule

    return torch.compile(model) if enabled and not isinstance(model, FSDPModule) else model


# ---------------------------------------------------------------- the launch's device, and decisions across ranks
def launch(train: TrainSection) -> Parallel:
    """``start``, after refusing a device this machine does not have (before accelerate fails deep inside) and
    before checking that accelerate placed the process where it was asked. ``cuda:N`` in one process makes GPU N
    the current one (accelerate then places the run there)."""
    wanted = train.device
    resolve_device(wanted, "--train.device")
    index = torch.device(wanted).index if wanted.startswith("cuda") else None
    if index is not None:
        if dist.launched_world_size() > 1:
            raise UserError(f"--train.device={wanted}: under torchrun / accelerate launch each process takes the GPU "
                            "of its local rank; use --train.device=cuda (and CUDA_VISIBLE_DEVICES to pick GPUs)")
        torch.cuda.set_device(index)
    parallel = start(train)
    if wanted not in ("auto", "cpu") and parallel.device.type != torch.device(wanted).type:
        raise UserError(f"--train.device={wanted} requested, but accelerate placed this process on {parallel.device}")
    return parallel


def on_main(action):
    """Run ``action`` on the main rank only; every rank gets its return value, or raises its error (a
    ``UserError``; an ``OSError`` is explained). So a refusal on the main rank stops every rank alike."""
    result, message, error = None, None, None
    if dist.is_main():
        try:
            result = action()
        except UserError as e:
            error, message = e, str(e)
        except OSError as e:
            message = explain(e)
            error = UserError(message)
        except Exception as e:  # a bug: the main rank shows its traceback, the others do not hang
            error, message = e, f"the main process failed ({type(e).__name__}: {e})"
    result, message = dist.broadcast_object((result, message))
    if message is not None:
        raise error if error is not None else UserError(message)
    return result
