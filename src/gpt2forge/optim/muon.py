"""Muon: SGD-momentum whose update matrix is orthogonalised by a Newton–Schulz iteration.

Why: for a hidden weight matrix the momentum-averaged gradient is dominated by a few directions (its top singular
values). Muon replaces that matrix M = U S Vᵀ by something close to U Vᵀ, so every direction in the row and column
space moves by about the same amount. On GPT-2-sized models this reaches AdamW's loss in roughly a third fewer
tokens (modded-nanogpt records #3–4). It is for 2-D hidden matrices only: embeddings, the head and all 1-D gains
and biases stay with AdamW.

Newton–Schulz: X ← aX + (bA + cA²)X with A = XXᵀ, started from X = M/‖M‖_F (so every singular value is ≤ 1)
and run on the wide orientation so that A is the smaller Gram matrix. The odd polynomial p(s) = as + bs³ + cs⁵
acts on each singular value separately and leaves U and V alone. Three published variants (``NS_VARIANTS``):

- ``jordan5``: (3.4445, −4.7750, 2.0315) five times (the Muon repository, track 1 until Polar Express).
  Deliberately non-convergent: the slope at zero is maximised so five steps lift even small singular values, at
  the price of ending in a band of about [0.68, 1.13] rather than at exactly 1 — which training does not mind.
- ``track3``: (2, −1.5, 0.5) twelve times (track 3's ``train_gpt_simple.py``, "not optimizing for wallclock
  speed"). A quintic too, with p(1) = 1 and p'(1) = 0: it converges, so singular values above ~1e-3 of the
  Frobenius norm end within 1e-5 of 1 — close to the exact polar factor U Vᵀ, at 2.4× the matmuls.
- ``polar_express``: five different triples, one per iteration (Amsel et al. 2025, arXiv 2505.16932, as
  modded-nanogpt's ``train_gpt.py`` runs them: computed for 5 iterations with a 2% safety factor), started from
  M/(1.02·‖M‖_F + 1e-6). Singular values above ~1e-3 of the norm end in about [0.86, 1.14].

Precision: on CUDA the iteration runs in bf16 (tensor cores; the band is coarse anyway). On CPU it runs in fp32,
because CPU bf16 matmuls are 15–80× slower than fp32 ones (768², five steps: 9.0 s vs 0.11 s on our 2-core
machines); ``ns_dtype`` overrides either choice.

Distributed: under DDP the gradients are already averaged, so they are identical on every rank. Every rank
updates every momentum buffer (an elementwise op, cheap, and it keeps the optimizer state complete on every rank
for checkpoints), but runs Newton–Schulz, the expensive part, only for its share of the matrices, then the
orthogonalised updates are exchanged so that every rank applies every update. Matrices of one shape form a
bucket; a bucket's matrices are dealt round-robin to the ranks (continuing from the previous bucket, so no rank
is always the one left with fewer) and gathered with one ``all_gather`` per bucket. Newton–Schulz is
deterministic for the same input, so the result is bit-identical to the single-process optimizer.

The optimizer keeps no schedule: it reads ``lr``, ``momentum`` and ``weight_decay`` from each param group at
every step (the trainer sets them from the step number), and its state is the momentum buffer alone, so the
base class's ``state_dict``/``load_state_dict`` give a bit-exact resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class NSVariant:
    """A Newton–Schulz iteration: its (a, b, c) per iteration, and the start X = M / (norm_scale·‖M‖_F + eps)."""

    coefficients: tuple[tuple[float, float, float], ...]
    norm_scale: float = 1.0
    eps: float = 1e-7

    def schedule(self, steps: int | None) -> tuple[tuple[float, float, float], ...]:
        """The triples of ``steps`` iterations (None: the variant's own count). A constant triple repeats; a
        per-iteration table has no triples past its end."""
        table = self.coefficients
        if steps is None:
            return table
        if len(set(table)) == 1:
            return table[:1] * steps
        if steps > len(table):
            raise ValueError(f"this Newton–Schulz variant has {len(table)} per-iteration triples; {steps} steps asked")
        return table[:steps]


NS_VARIANTS = {
    "jordan5": NSVariant(((3.4445, -4.7750, 2.0315),) * 5),
    "track3": NSVariant(((2.0, -1.5, 0.5),) * 12),
    "polar_express": NSVariant((
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ), norm_scale=1.02, eps=1e-6),
}


def newton_schulz(G: Tensor, steps: int | None = None, dtype: torch.dtype | None = None,
                  variant: str = "jordan5", eps: float | None = None) -> Tensor:
    """Approximately orthogonalise the last two dims of ``G`` (U S Vᵀ → U S' Vᵀ, S' near 1; see the variants).

    Runs in ``dtype`` (None: bf16 on CUDA, fp32 elsewhere); returns a contiguous tensor of G's shape and dtype.
    ``eps`` (None: the variant's) guards the normalisation of an all-zero G.
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz needs a matrix or a batch of them (2-D or 3-D); got shape {tuple(G.shape)}")
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    spec = NS_VARIANTS[variant]
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # wide orientation: A = X Xᵀ is the small Gram matrix
    norm = X.norm(dim=(-2, -1), keepdim=True)
    X = X / ((norm if spec.norm_scale == 1 else norm * spec.norm_scale) + (spec.eps if eps is None else eps))
    # Fused multiply-adds: one rounding per product instead of three, which halves the error in bf16.
    addmm = torch.addmm if X.ndim == 2 else torch.baddbmm
    for a, b, c in spec.schedule(steps):
        A = X @ X.mT
        B = addmm(A, A, A, beta=b, alpha=c)  # bA + cA²
        X = addmm(X, B, X, beta=a)  # aX + BX
    if tall:
        X = X.mT
    # Contiguous whatever the orientation, so the caller's elementwise ops take the same kernel on every path.
    return X.to(G.dtype).contiguous()


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters (rows = fan_out, as in ``nn.Linear.weight``).

    Per parameter and step, with μ = momentum, g the gradient and B the momentum buffer (an EMA, as in the
    reference code and ``torch.optim.Muon``):

        B ← B + (1 − μ)(g − B)                      (``B.lerp_(g, 1 − μ)``)
        M ← g + μ(B − g) if nesterov else B        (``g.lerp(B, μ)``)
        O ← newton_schulz(M)
        W ← W · (1 − lr · weight_decay)            (decoupled; plain lr, not the shape-scaled one)
        W ← W − lr · √max(1, rows/cols) · O

    ``process_group``: the ranks that share the Newton–Schulz work (default: the default group, when
    ``torch.distributed`` is initialised with more than one rank). All ranks must hold the same gradients.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns: str = "jordan5",
        ns_steps: int | None = None,
        ns_dtype: torch.dtype | None = None,
        ns_eps: float | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if lr < 0 or not 0 <= momentum <= 1 or weight_decay < 0 or (ns_steps is not None and ns_steps < 0):
            raise ValueError(f"Muon: bad hyperparameters lr={lr} momentum={momentum} weight_decay={weight_decay} "
                             f"ns_steps={ns_steps}")
        if ns not in NS_VARIANTS:
            raise ValueError(f"Muon: unknown Newton–Schulz variant {ns!r}; choose one of {', '.join(NS_VARIANTS)}")
        NS_VARIANTS[ns].schedule(ns_steps)  # refuses more steps than a per-iteration table has
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                    "ns": ns, "ns_steps": ns_steps, "ns_dtype": ns_dtype, "ns_eps": ns_eps}
        self.process_group = process_group  # not in defaults: a process group is not picklable state
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # load_state_dict keeps the saved groups: older ones predate variants
            group.setdefault("ns", "jordan5")
            group.setdefault("ns_eps", None)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.ndim != 2:
                self.param_groups.pop()
                raise ValueError(f"Muon takes only 2-D parameters (matrices); got one of shape {tuple(p.shape)}. "
                                 "Give embeddings, the head, gains and biases to AdamW.")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, groups, updates = [], [], []
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue  # under DDP the same params lack a grad on every rank
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - momentum)
                params.append(p)
                groups.append(group)
                updates.append(g.lerp(buf, momentum) if group["nesterov"] else buf)

        for p, group, update in zip(params, groups, self._orthogonalise(updates, groups)):
            lr, weight_decay = group["lr"], group["weight_decay"]
            if weight_decay:
                p.mul_(1 - lr * weight_decay)
            p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))
        return loss

    def _orthogonalise(self, updates: list[Tensor], groups: list[dict]) -> list[Tensor]:
        """newton_schulz of every update; under torch.distributed each rank computes its share and gathers."""
        def ns(i: int) -> Tensor:
            g = groups[i]
            return newton_schulz(updates[i], g["ns_steps"], g["ns_dtype"], g["ns"], g["ns_eps"])

        world = dist.get_world_size(self.process_group) if dist.is_available() and dist.is_initialized() else 1
        if world == 1:
            return [ns(i) for i in range(len(updates))]
        rank = dist.get_rank(self.process_group)
        buckets: dict[tuple, list[int]] = {}
        for i, u in enumerate(updates):
            buckets.setdefault((u.shape, u.dtype), []).append(i)
        # One all_gather per shape rather than one broadcast per matrix: a few large collectives instead of one
        # per matrix (fewer launches and syncs), and every rank sends at the same time. all_gather needs
        # equal-shaped pieces, hence the buckets; the list form (not all_gather_into_tensor) works on gloo and
        # NCCL across our supported torch versions.
        result: list[Tensor | None] = [None] * len(updates)
        pending, turn = [], 0
        for members in buckets.values():
            owners = [(turn + k) % world for k in range(len(members))]
            turn += len(members)
            slots = -(-len(members) // world)  # matrices per rank, padded: every rank sends the same shape
            mine = [i for i, owner in zip(members, owners) if owner == rank]
            local = updates[members[0]].new_zeros((slots, *updates[members[0]].shape))
            for k, i in enumerate(mine):
                local[k] = ns(i)
            gathered = [torch.empty_like(local) for _ in range(world)]
            pending.append(dist.all_gather(gathered, local, group=self.process_group, async_op=True))
            seen = [0] * world
            for i, owner in zip(members, owners):
                result[i] = gathered[owner][seen[owner]]
                seen[owner] += 1
        for work in pending:
            work.wait()
        return result
