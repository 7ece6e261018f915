"""Muon under FSDP2: each rank holds some rows of every matrix; the step gathers each update whole, orthogonalises
the matrices round-robin across ranks and applies each rank's own rows of the result. On gloo CPU processes, the
weights and momentum buffers after several steps equal the single-process optimizer's bit for bit, uneven row
splits (and a rank with no rows of a matrix) included."""

import shutil
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from test_train import config, metric_losses, tiny_overrides, torchrun

from gpt2forge.optim.muon import Muon
from gpt2forge.train.trainer import train

# several buckets (shapes), tall and wide, rows that do not split evenly, a matrix with fewer rows than ranks
SHAPES = [(64, 32), (64, 32), (64, 32), (32, 64), (32, 64), (48, 48), (7, 5), (1, 8)]
STEPS = 3


def settings(params):
    return [{"params": params[:5], "weight_decay": 0.1}, {"params": params[5:], "weight_decay": 0.0, "lr": 0.03}]


def gradients(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def initial() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def single_process() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = [torch.nn.Parameter(w.clone()) for w in initial()]
    optimizer = Muon(settings(params), lr=0.02, momentum=0.9)
    for step in range(STEPS):
        for p, g in zip(params, gradients(step)):
            p.grad = g
        optimizer.step()
    return [p.detach() for p in params], [optimizer.state[p]["momentum_buffer"] for p in params]


def sharded(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        holder = torch.nn.Module()
        holder.weights = torch.nn.ParameterList([torch.nn.Parameter(w.clone()) for w in initial()])
        fully_shard(holder)
        params = list(holder.weights)
        assert all(isinstance(p, DTensor) for p in params)
        optimizer = Muon(settings(params), lr=0.02, momentum=0.9)
        for step in range(STEPS):
            for p, g in zip(params, gradients(step)):
                p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
            optimizer.step()
        buffers = [optimizer.state[p]["momentum_buffer"] for p in params]
        assert all(isinstance(b, DTensor) for b in buffers)  # sharded like the weights (checkpoints reshard it)
        full = ([p.full_tensor() for p in params], [b.full_tensor() for b in buffers])
        if rank == 0:
            torch.save(full, out)
    finally:
        torch_dist.destroy_process_group()


def test_muon_under_fsdp2_equals_the_single_process_optimizer_bit_for_bit(tmp_path):
    expected_weights, expected_buffers = single_process()
    for world in (2, 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tmp_path / f"world{world}.pt"
        mp.spawn(sharded, args=(world, port, str(out)), nprocs=world)  # a rank's exception is raised here
        weights, buffers = torch.load(out)
        for i, shape in enumerate(SHAPES):
            assert torch.equal(weights[i], expected_weights[i]), (world, shape)
            assert torch.equal(buffers[i], expected_buffers[i]), (world, shape)


MODERN_MUON = {"model.arch": "modern", "optim.optimizer": "muon", "optim.matrix_lr": 0.02,
               "optim.muon_momentum_warmup_steps": 4, "eval.val_every": 0, "train.distributed": "fsdp"}


def test_the_modern_recipe_under_fsdp2_matches_one_process_and_resumes_exactly_and_elastically(data_dir, tmp_path):
    """2-process FSDP2 with Muon: the losses of one process (2 accumulation steps) to fp32 rounding; resumed from
    its sharded checkpoint on 2 processes bit for bit, and on 4 with the uninterrupted losses."""
    single = train(config(data_dir, tmp_path / "single", **MODERN_MUON)).losses
    torchrun(["train", *tiny_overrides(data_dir, tmp_path / "whole", **MODERN_MUON)])
    whole = metric_losses(tmp_path / "whole" / "run")
    assert whole.keys() == single.keys()
    for step, loss in single.items():
        assert whole[step] == pytest.approx(loss, rel=1e-5)
    torchrun(["train", *tiny_overrides(data_dir, tmp_path / "half", **{**MODERN_MUON, "train.max_steps": 4})])
    shutil.copytree(tmp_path / "half", tmp_path / "elastic")
    torchrun(["train", "--resume", *tiny_overrides(data_dir, tmp_path / "half", **MODERN_MUON)])
    assert metric_losses(tmp_path / "half" / "run") == whole
    torchrun(["train", "--resume", *tiny_overrides(data_dir, tmp_path / "elastic",
                                                   **{**MODERN_MUON, "train.micro_batch_size": 2})], nproc=4)
    elastic = metric_losses(tmp_path / "elastic" / "run")
    for step, loss in whole.items():
        assert elastic[step] == pytest.approx(loss, rel=1e-4)
