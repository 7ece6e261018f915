"""What to say when a step does not fit in the GPU's memory: the flag, and a value to try.

``smaller_micro_batch`` halves and keeps the batch arithmetic valid; a memory estimate (``bench/memory.py``
measures them) could refine it.
"""

from __future__ import annotations

from ..config import TrainSection


def smaller_micro_batch(train: TrainSection, world_size: int) -> int | None:
    """A ``train.micro_batch_size`` to try after running out of memory: the largest at most half the current one
    that still divides ``total_batch_tokens`` evenly (None below 1). A memory estimate could refine it."""
    per_sequence = train.seq_len * world_size
    return next((m for m in range(train.micro_batch_size // 2, 0, -1)
                 if train.total_batch_tokens % (m * per_sequence) == 0), None)


def out_of_memory_message(train: TrainSection, world_size: int, step: int) -> str:
    smaller = smaller_micro_batch(train, world_size)
    what = f"the GPU ran out of memory at step {step + 1} with train.micro_batch_size={train.micro_batch_size}"
    if smaller is None:
        return (f"{what}: even one sequence per GPU does not fit; use a smaller model, a shorter --train.seq_len, "
                "or shard the model over more GPUs (--train.distributed=fsdp)")
    return (f"{what}; use --train.micro_batch_size={smaller} (gradient accumulation keeps the batch of "
            f"{train.total_batch_tokens:,} tokens)")
