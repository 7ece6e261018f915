"""Optimizers from named parameter groups, one or several per run, driven by pure schedules of the step.

Every parameter gets a role from the model (``models.parameter_roles``: matrix, embedding, head, scalar, and for
the modern model's optional parts lambda and value_embed). The recipe says which optimizer takes the hidden
matrices (AdamW, or Muon) — everything else is AdamW — and each role's peak LR and weight decay (gains and biases:
``scalar_weight_decay``, 0 unless a recipe such as track 3 decays them; the lambda role's mixing coefficients:
never, decay would pull a residual scale toward 0). Parameters whose (optimizer, LR scale, weight decay) agree
share a param group, in the model's parameter order, so GPT-2's recipe gets exactly its two AdamW groups (decay on
≥ 2-D weights, none on gains and biases) and its losses stay bit-identical.

``Optimizers`` is what the loop and the checkpoint see: ``set_step(step)`` writes every group's LR (and Muon's
momentum) from the schedules, ``step()``/``zero_grad()`` go to every optimizer, and the state is one entry per
optimizer, so a second optimizer resumes as exactly as the first.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..config import OptimSection
from ..models import parameter_roles
from .schedules import lr_at, muon_momentum_at

__all__ = ["GroupSpec", "Optimizers", "build_optimizers", "lr_at", "make_adamw", "make_muon", "muon_momentum_at"]


@dataclass(frozen=True)
class GroupSpec:
    """One param group: which optimizer, which roles it holds, its LR relative to optim.lr, its weight decay."""

    optimizer: str
    roles: tuple[str, ...]
    lr_scale: float
    weight_decay: float


def group_settings(role: str, optim: OptimSection) -> tuple[str, float, float]:
    """(optimizer, LR scale, weight decay) of a parameter role under ``optim``."""
    optimizer = optim.optimizer if role == "matrix" else "adamw"
    weight_decay = {"scalar": optim.scalar_weight_decay, "lambda": 0.0}.get(role, optim.weight_decay)
    if role == "matrix" and optim.matrix_weight_decay is not None:
        weight_decay = optim.matrix_weight_decay
    return optimizer, optim.role_lr(role) / optim.lr, weight_decay


class Optimizers:
    """The run's optimizers by name (``adamw``, ``muon``), with the group specs their LRs are set from."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], specs: dict[str, list[GroupSpec]],
                 optim: OptimSection, max_steps: int) -> None:
        self.optimizers, self.specs, self.optim, self.max_steps = optimizers, specs, optim, max_steps

    def items(self):
        return self.optimizers.items()

    def set_step(self, step: int) -> float:
        """Write the LRs (and Muon's momentum) of ``step`` into every group; return the base LR."""
        lr = lr_at(step, self.optim, self.max_steps)
        for name, optimizer in self.optimizers.items():
            for group, spec in zip(optimizer.param_groups, self.specs[name]):  # by position: survives load_state_dict
                group["lr"] = lr * spec.lr_scale
                if name == "muon":
                    group["momentum"] = muon_momentum_at(step, self.optim, self.max_steps)
                    if self.optim.muon_cautious_wd:  # the decay follows the schedule: lr_t/lr of its lr_t·wd
                        group["weight_decay"] = spec.weight_decay * lr / self.optim.lr
        return lr

    def step(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])


def build_optimizers(model: torch.nn.Module, optim: OptimSection, device_type: str, max_steps: int) -> Optimizers:
    """The optimizers of ``model`` (the unwrapped module; under FSDP its parameters are the sharded ones)."""
    params = dict(model.named_parameters())
    groups: dict[tuple[str, float, float], tuple[list[str], list[torch.nn.Parameter]]] = {}
    for name, role in parameter_roles(model).items():
        roles, members = groups.setdefault(group_settings(role, optim), ([], []))
        if role not in roles:
            roles.append(role)
        members.append(params[name])
    optimizers, specs = {}, {}
    for name in ("adamw", "muon"):
        mine = [(key, roles, members) for key, (roles, members) in groups.items() if key[0] == name]
        if not mine:
            continue
        specs[name] = [GroupSpec(name, tuple(roles), scale, wd) for (_, scale, wd), roles, _ in mine]
        param_groups = [{"params": members, "weight_decay": wd} for (_, _, wd), _, members in mine]
        optimizers[name] = (make_adamw(param_groups, optim, device_type) if name == "adamw"
                            else make_muon(param_groups, optim))
    return Optimizers(optimizers, specs, optim, max_steps)


def make_adamw(param_groups: list[dict], optim: OptimSection, device_type: str) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step when asked and the device supports it (CUDA and CPU)."""
    supported = "fused" in inspect.signature(torch.optim.AdamW).parameters
    fused = optim.fused and device_type in ("cuda", "cpu") and supported
    return torch.optim.AdamW(param_groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             fused=fused or None)


def make_muon(param_groups: list[dict], optim: OptimSection) -> torch.optim.Optimizer:
    from .muon import Muon

    return Muon(param_groups, lr=optim.role_lr("matrix"), momentum=optim.muon_momentum,
                nesterov=optim.muon_nesterov, ns=optim.muon_ns, ns_steps=optim.muon_ns_steps,
                ns_eps=optim.muon_ns_eps, normuon=optim.muon_normuon, beta2=optim.muon_beta2,
                cautious_wd=optim.muon_cautious_wd)
