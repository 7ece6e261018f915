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
bucket, cut into one contiguous chunk per rank (the short chunks of uneven buckets go to different ranks from
bucket to bucket) and put back together by one ``all_gather`` per bucket, in the iteration's dtype. Newton–Schulz
is deterministic for the same input, and a batched matmul rounds each matrix the same whatever else is in the
batch, so the result is bit-identical to the single-process optimizer (tests/test_muon.py checks it on 2 CPU processes).

Under FSDP2 the parameters, their gradients and the momentum buffers are DTensors: each rank holds some rows of
every matrix. The momentum, the decay and the update stay elementwise on each rank's own rows (``to_local``), so
the buffers stay sharded (checkpoints save and reshard them like AdamW's moments). Newton–Schulz needs the whole
matrix: each update is gathered whole (``full_tensor``, an all-gather), the buckets are orthogonalised exactly as
under DDP (each rank its chunk, one all_gather per bucket), and each rank takes its own rows of the result
(``distribute_tensor`` with ``src_data_rank=None``: a slice, no communication). Every value is computed as the
single-process optimizer computes it, so the step is bit-identical to it (tests/test_muon_fsdp.py, 2 and 3 CPU
processes, uneven rows). The price: the hidden matrices' updates exist whole on every rank during the step (a
transient copy of their size), and an all-gather of them on top of FSDP's own.

The optimizer keeps no schedule: it reads ``lr``, ``momentum`` and ``weight_decay`` from each param group at
every step (the trainer sets them from the step number), and its state is the momentum buffer (and NorMuon's
row second moments), so the base class's ``state_dict``/``load_state_dict`` give a bit-exact resume.

What happens to one matrix after its orthogonalisation (NorMuon's rows, the cautious decay, the update) is in
``normuon_`` and ``decay_``, apart from the code that shares the orthogonalisation among ranks: every rank runs
them on every matrix, on the same inputs, so they keep the distributed step equal to the single-process one.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor


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
    spec = NS_VARIANTS[variant]
    X = G.to(dtype or ns_dtype_for(G.device))
    return _iterate(X, spec.schedule(steps), spec.norm_scale, spec.eps if eps is None else eps).to(G.dtype)


def ns_dtype_for(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (tensor cores), fp32 elsewhere (CPU bf16 matmuls are 15–80× slower than fp32 ones)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _iterate(X: Tensor, coefficients: tuple[tuple[float, float, float], ...], norm_scale: float,
             eps: float) -> Tensor:
    """The iteration on ``X`` (a matrix or a batch, already in the compute dtype): a contiguous result of its shape.
    Plain tensor code with constant coefficients, so torch.compile traces it into one graph per shape."""
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT  # wide orientation: A = X Xᵀ is the small Gram matrix
    norm = X.norm(dim=(-2, -1), keepdim=True)
    X = X / ((norm if norm_scale == 1 else norm * norm_scale) + eps)  # ‖X‖₂ ≤ ‖X‖_F ≤ 1
    # Fused multiply-adds: one rounding per product instead of three, which halves the error in bf16.
    addmm = torch.addmm if X.ndim == 2 else torch.baddbmm
    for a, b, c in coefficients:
        A = X @ X.mT
        B = addmm(A, A, A, beta=b, alpha=c)  # bA + cA²
        X = addmm(X, B, X, beta=a)  # aX + BX
    if tall:
        X = X.mT
    # Contiguous whatever the orientation, so the caller's elementwise ops take the same kernel on every path.
    return X.contiguous()


def _local(t: Tensor) -> Tensor:
    """This rank's part of an FSDP2 (DTensor) tensor, the tensor itself otherwise; in-place ops on it change it."""
    return t.to_local() if isinstance(t, DTensor) else t


def _whole(p: Tensor, local: Tensor) -> Tensor:
    """The whole matrix of which ``local`` holds this rank's rows, laid out as ``p`` (an all-gather), for a
    DTensor parameter; ``local`` itself otherwise."""
    if not isinstance(p, DTensor):
        return local
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride()).full_tensor()


def _own_rows(p: Tensor, whole: Tensor) -> Tensor:
    """This rank's part of ``whole`` laid out as the DTensor ``p`` (a slice of the copy every rank holds: no
    communication); ``whole`` itself for a plain tensor."""
    if not isinstance(p, DTensor):
        return whole
    return distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local()


def normuon_(O: Tensor, second_moment: Tensor, beta2: float) -> Tensor:
    """NorMuon's row normalisation of one orthogonalised update ``O`` [rows, cols] (returned in O's dtype).

    Orthogonalisation equalises the singular values, not the rows: some output neurons still get much larger
    updates than others. Each row is divided by the root of an EMA (``beta2``) of its mean square, kept in
    ``second_moment`` [rows, 1] (updated in place), and the result is scaled back to O's Frobenius norm, so the
    step size stays Muon's and only its spread over the rows changes. No bias correction: a constant factor
    across rows, which the rescaling removes."""
    X = O.float()
    second_moment.lerp_(X.square().mean(dim=1, keepdim=True), 1 - beta2)
    Y = X * second_moment.clamp_min(1e-10).rsqrt()
    Y = Y * (X.norm() / Y.norm().clamp_min(1e-10))
    return Y.to(O.dtype)


def decay_(params: list[Tensor], updates: list[Tensor], rate: float, cautious: bool) -> None:
    """Decoupled weight decay W ← W·(1 − rate) before the update W ← W − lr·s·O; ``cautious``: only the entries
    where O and W agree in sign (O·W ≥ 0, as modded-nanogpt), i.e. where the update already pulls W toward 0, so
    the decay never fights the gradient's direction. The update never reads W, so decaying first is the same."""
    if not rate:
        return
    if not cautious:
        torch._foreach_mul_(params, 1 - rate)
        return
    for p, o in zip(params, updates):
        p.mul_(torch.where(o * p >= 0, 1 - rate, 1.0).to(p.dtype))


@functools.cache
def _compiled_iterate() -> Callable[..., Tensor]:
    return torch.compile(_iterate, dynamic=False, fullgraph=True)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters (rows = fan_out, as in ``nn.Linear.weight``).

    Per parameter and step, with μ = momentum, g the gradient and B the momentum buffer (an EMA, as in the
    reference code and ``torch.optim.Muon``):

        B ← B + (1 − μ)(g − B)                      (``B.lerp_(g, 1 − μ)``)
        M ← g + μ(B − g) if nesterov else B        (``g.lerp(B, μ)``)
        O ← newton_schulz(M)
        O ← normuon_(O)                            (only with ``normuon``: rows normalised, norm kept)
        W ← W · (1 − lr · weight_decay)            (decoupled; plain lr, not the shape-scaled one; with
                                                    ``cautious_wd`` only where O·W ≥ 0)
        W ← W − lr · √max(1, rows/cols) · O

    As launched: the momentum, the decay and the update are one ``torch._foreach_*`` op per param group (one
    fused kernel each on CUDA, not one per matrix); the matrices of one shape and Newton–Schulz setting form a
    bucket, stacked and orthogonalised by one batched iteration (``compile``: through torch.compile, by default
    on CUDA; eager on a CPU, where compiling gains nothing over the BLAS calls); nothing reads a value back to
    the host. At the model's shapes the CPU's batched matmuls round exactly as the per-matrix ones, so the step is
    bit-identical to the per-matrix loop it replaced (``benchmarks/muon_step.py`` checks it at the 124M model's
    shapes); at toy sizes torch's CPU bmm runs its own loop, which differs from mm's BLAS call by an ulp or so.

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
        normuon: bool = False,
        beta2: float = 0.95,
        cautious_wd: bool = False,
        process_group: dist.ProcessGroup | None = None,
        compile: bool | None = None,
    ) -> None:
        if (lr < 0 or not 0 <= momentum <= 1 or weight_decay < 0 or (ns_steps is not None and ns_steps < 0)
                or not 0 <= beta2 < 1):
            raise ValueError(f"Muon: bad hyperparameters lr={lr} momentum={momentum} weight_decay={weight_decay} "
                             f"ns_steps={ns_steps} beta2={beta2}")
        if ns not in NS_VARIANTS:
            raise ValueError(f"Muon: unknown Newton–Schulz variant {ns!r}; choose one of {', '.join(NS_VARIANTS)}")
        NS_VARIANTS[ns].schedule(ns_steps)  # refuses more steps than a per-iteration table has
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                    "ns": ns, "ns_steps": ns_steps, "ns_dtype": ns_dtype, "ns_eps": ns_eps, "normuon": normuon,
                    "beta2": beta2, "cautious_wd": cautious_wd}
        # Neither is in defaults: a process group is not picklable state, and compiling is how, not what.
        self.process_group, self.compile = process_group, compile
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # load_state_dict keeps the saved groups: older ones predate variants
            for key, value in {"ns": "jordan5", "ns_eps": None, "normuon": False, "beta2": 0.95,
                               "cautious_wd": False}.items():
                group.setdefault(key, value)

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
        buckets: dict[tuple, list[tuple[Tensor, dict, Tensor]]] = {}
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]  # under DDP the same on every rank
            if not params:
                continue
            grads = [_local(p.grad) for p in params]  # FSDP2: this rank's rows
            buffers = [_local(self._buffer(p)) for p in params]
            momentum = group["momentum"]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            for p, update in zip(params, updates):
                key = (p.shape, p.dtype, p.device, group["ns"], group["ns_steps"], group["ns_dtype"], group["ns_eps"])
                buckets.setdefault(key, []).append((p, group, _whole(p, update)))

        for ((shape, dtype, *_), members), orthogonal in zip(buckets.items(), self._orthogonalise(buckets)):
            scale = math.sqrt(max(1.0, shape[0] / shape[1]))
            by_group: dict[int, tuple[dict, list[Tensor], list[Tensor]]] = {}
            for (p, group, _), o in zip(members, orthogonal.to(dtype).unbind(0)):
                if group["normuon"]:
                    o = normuon_(o, self._second_moment(p), group["beta2"])
                _, params, updates = by_group.setdefault(id(group), (group, [], []))
                params.append(_local(p))
                updates.append(_own_rows(p, o))
            for group, params, updates in by_group.values():
                decay_(params, updates, group["lr"] * group["weight_decay"], group["cautious_wd"])
                torch._foreach_add_(params, updates, alpha=-group["lr"] * scale)
        return loss

    def _second_moment(self, p: Tensor) -> Tensor:
        """NorMuon's EMA of the mean square of each row of the update: [rows, 1], float32, zeros at first."""
        state = self.state[p]
        if "second_moment" not in state:
            state["second_moment"] = torch.zeros(p.size(0), 1, dtype=torch.float32, device=p.device)
        return state["second_moment"]

    def _buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        return state["momentum_buffer"]

    def _iterate(self, X: Tensor, *args) -> Tensor:
        """``_iterate``, compiled where asked (default: on CUDA). A failing compile is said once and run eagerly:
        a slower step, not a lost run."""
        if self.compile if self.compile is not None else X.is_cuda:
            try:
                return _compiled_iterate()(X, *args)
            except Exception as e:  # any backend failure: the eager path computes the same
                reason = (str(e).splitlines() or [""])[0]
                warnings.warn(f"Muon: torch.compile of Newton–Schulz failed ({type(e).__name__}: {reason}); running "
                              "it eagerly", RuntimeWarning, stacklevel=3)
                self.compile = False
        return _iterate(X, *args)

    def _orthogonalise(self, buckets: dict[tuple, list[tuple[Tensor, dict, Tensor]]]) -> list[Tensor]:
        """Per bucket, the stacked Newton–Schulz results [n, rows, cols] in the compute dtype. Under
        torch.distributed the bucket is cut into one chunk per rank; each rank orthogonalises its chunk and one
        all_gather per bucket (in the compute dtype: bf16 on CUDA, so half the bytes of fp32 and no rounding the
        single-process step lacks) puts the bucket together on every rank."""
        world = dist.get_world_size(self.process_group) if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank(self.process_group) if world > 1 else 0
        results, pending, turn = [], [], 0
        for (shape, _, device, ns, steps, dtype, eps), members in buckets.items():
            spec = NS_VARIANTS[ns]
            n, dtype = len(members), dtype or ns_dtype_for(device)
            slots = -(-n // world)  # matrices per chunk: every rank sends the same shape
            chunk = (rank - turn) % world  # chunk c goes to rank (c + turn) % world: the short chunks move round
            start, end = min(chunk * slots, n), min(chunk * slots + slots, n)
            if end > start:
                X = torch.stack([update for _, _, update in members[start:end]]).to(dtype)
                local = self._iterate(X, spec.schedule(steps), spec.norm_scale, spec.eps if eps is None else eps)
            if end - start < slots:  # a short chunk, padded with zeros
                padded = torch.zeros((slots, *shape), dtype=dtype, device=device)
                if end > start:
                    padded[: end - start] = local
                local = padded
            if world == 1:
                results.append(local)
                continue
            # The list form of all_gather (not all_gather_into_tensor) works on gloo and NCCL across our torch
            # versions; every rank sends at the same time, and the next bucket's work overlaps this one's transfer.
            gathered = [torch.empty_like(local) for _ in range(world)]
            pending.append(dist.all_gather(gathered, local, group=self.process_group, async_op=True))
            results.append((gathered, turn, n))
            turn += n
        for work in pending:
            work.wait()
        if world == 1:
            return results
        return [torch.cat([gathered[(c + t) % world] for c in range(world)])[:n] for gathered, t, n in results]
