"""How the model is spread over processes: the process group (via accelerate), DDP or FSDP2, and compile.

FSDP is PyTorch's FSDP2 (``fully_shard`` per block, then the rest), not accelerate's FSDP plugin, which refuses
to run without an accelerator and so could not be tested on CPUs. Precision and compile are ours: accelerate is
told to add neither, so an ``accelerate config`` default can never add a second autocast behind our back.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from ..config import TrainSection


@dataclass
class Parallel:
    """The process group's view from this process, and the model as each code path needs it."""

    accelerator: object
    device: torch.device
    rank: int
    world_size: int
    fsdp: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP (accelerate's) or FSDP2 around ``model``; the model itself on one process."""
        if not self.fsdp:
            return self.accelerator.prepare(model)
        from torch.distributed.fsdp import fully_shard

        # the logits are a slice (view) when the vocab is padded; nothing modifies them in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)

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
            with self.accelerator.no_sync(wrapped):
                yield


def start(train: TrainSection) -> Parallel:
    """Join the process group the launcher (torchrun, accelerate launch, or none) describes."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=train.device == "cpu", mixed_precision="no", dynamo_backend="no")
    world_size = accelerator.num_processes
    return Parallel(accelerator, accelerator.device, accelerator.process_index, world_size,
                    fsdp=train.distributed == "fsdp" and world_size > 1)


def compiled(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(model)`` when enabled. The uncompiled handle stays the caller's: weights, sampling, export."""
    return torch.compile(model) if enabled else model
