"""Memory per rank before it is spent: weights, gradients, optimizer state and activations of a run config.

Why: a micro-batch that does not fit ends, minutes into a launch (after compile), in a CUDA out-of-memory
traceback. The estimate is a pure function of the config (parameters counted on a ``meta``-device model: nothing
is allocated), so it can be printed by ``--print-config``, logged before the first step, and asked, after an
out-of-memory error, for the largest micro-batch that fits.

Per rank, in bytes (N parameters; FSDP divides the first three by the world size):

- weights 4N, gradients 4N (fp32: autocast computes in bf16 but keeps fp32 parameters and gradients);
- optimizer state: AdamW 2 × 4 bytes per parameter it holds; Muon one fp32 momentum buffer per hidden matrix
  (embeddings, head, gains and biases stay with AdamW);
- activations saved for the backward, per micro-batch of B sequences of T tokens, width C, L blocks, with
  f = 4 bytes (the fp32 residual stream and norm statistics, fp32 under autocast too) and a = the compute dtype
  (2 under bf16 autocast, 4 in fp32):
    GPT-2 block: B·T·C·(2f + 14a): the block's two residual inputs, LayerNorm outputs (2), q, k, v (3), the
      attention output (1; SDPA's output layout makes the head merge free), MLP hidden before and after GELU (8);
    modern block: B·T·C·(6f + 15a) in fp32 and (6f + 17a) in bf16: RMSNorm keeps its normalised input as well
      (torch's composite rms_norm), QK-norm its fp32 q and k, rotary a new q and k, the head merge a copy, and
      under autocast each of q, k, v casts the normed input itself (2 more);
    ends: the final norm (f + a; modern 2f + a, and 2f for the embedding norm);
    bf16 autocast also keeps a bf16 copy of every matrix the forward multiplies by (2 bytes per matrix and head
      parameter); ``train.attention = "manual"`` adds the B·nh·T² attention probabilities per block (fp32, + a
      bf16 copy under CUDA autocast);
    the backward's working set: one block's MLP-hidden gradients and the residual stream's, B·T·C·(8a + 2f);
- the head and loss at their peak, with N_t = B·T rows and V the (padded) vocabulary: the chunked loss keeps the
  logits (a·N_t·V) and writes their gradient (a·N_t·V) while 3 fp32 chunks are alive (4 with a soft cap), of
  ≤ 256 MB on a GPU or compiled, ≤ 2 MB eager on a CPU (``models/loss.py``); the reference loss's backward
  holds 4 fp32 [N_t, V] tensors (log-probabilities, their gradient, the softmax's temporaries; 5 with a tanh soft
  cap, whose tanh is kept; 8 with the algebraic one);
- DDP: gradient buckets (4N: accelerate's DDP copies gradients into buckets); FSDP: the unsharded parameters and
  gradients of the root (embeddings, head) and of two blocks (the current one and the prefetched one);
- the optimizer step's temporaries: Muon's Nesterov updates and their orthogonalised copies (2 × its matrices),
  and the largest same-shape bucket's Newton–Schulz working set (3 × the bucket: Muon stacks each shape).

Total = weights + gradients + optimizer state + DDP/FSDP buffers + max(activations + loss peak, optimizer step).
Gradients count in full during the backward: exact under gradient accumulation (earlier micro-steps' gradients
are alive), an overestimate by at most 4N without it.

Eager PyTorch, as measured on a CPU; not yet measured on a GPU. ``torch.compile`` saves fewer activations (fused
elementwise ops, recomputation), and CUDA's fused kernels (flash attention, fused norms) should save no more than
the CPU's composite ones, so for GPUs the activations are meant as an upper bound. Not counted: the CUDA context
and allocator fragmentation (``fitting_micro_batch`` keeps 10% of the device free for them).

Measured on a CPU (torch 2.13, eager; the peak RSS of a fresh process over its baseline while it builds the
model and optimizers and runs two optimizer steps of the trainer's kind, glibc's mmap threshold fixed at 64 KiB
so that freed tensors leave the RSS as they leave CUDA's allocated memory), estimate / measured:
GPT-2 tiny (4×128, vocab 50,304, B=8, T=256, fp32) 0.96 with the reference loss, 0.93 chunked; 6 blocks × 256,
vocab 4,096, B=16, T=256: GPT-2 chunked fp32 0.93, reference bf16 0.93; modern + Muon chunked fp32 0.94,
reference bf16 0.91; modern tiny + Muon chunked fp32 0.93, reference fp32 0.97 (the chunked ones re-measured with
the CPU's 2 MB chunks, and estimated with them). ``tests/test_memory_estimate.py``
keeps two of them within ±25%, and the saved-activation formula within 3% of what autograd saves. With glibc's
default (adaptive) threshold the heap keeps freed mid-size blocks: RSS reads 1.2–1.5× the estimate.
GPT-2 124M, B=4, T=1024, fp32 (``benchmarks/results/bench-cpu-memory.md``, what a step adds on top of the weights
and AdamW state, default allocator): gradients + activations + loss peak are estimated at 6,064 MiB with the
reference loss (measured 5,774: 1.05) and 4,501 MiB chunked (measured 4,210: 1.07; 5,263 on a GPU, whose chunks
are larger).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from ..config import Config
from ..errors import UserError
from ..models import build_model, config_from_dict, parameter_roles
from ..models.loss import chunk_bytes

F32 = 4  # bytes of fp32: parameters, gradients, optimizer state, the residual stream
CHUNKS_ALIVE = 3  # fp32 chunks of the chunked loss alive at once in its backward
REFERENCE_LOSS_COPIES = 4  # fp32 [N_t, V] tensors at the reference loss's peak (+1 for a soft cap's saved tanh)
HEADROOM = 0.10  # of device memory left for the CUDA context, workspaces and allocator fragmentation
GIB = 2**30
ACTIVATION_FORMULAS = ("gpt2", "modern")  # the architectures saved_activation_bytes knows


@dataclass(frozen=True)
class Counts:
    """Parameter counts of a model config, by what the estimate needs (tied weights once)."""

    total: int
    muon: int  # hidden matrices (Muon's when optim.optimizer = muon)
    muon_bucket: int  # the largest set of same-shape hidden matrices: Muon orthogonalises each set stacked
    multiplied: int  # weights the forward multiplies by (linear layers and the head): autocast's bf16 copies
    root: int  # outside the repeated blocks (embeddings, head, final norm): FSDP's root unit
    block: int  # one block


@functools.lru_cache(maxsize=32)
def _counts(model_fields: tuple) -> Counts:
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = build_model(config_from_dict(dict(model_fields)))
    roles = parameter_roles(model)
    params = dict(model.named_parameters())
    block = sum(p.numel() for p in model.blocks[0].parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    buckets: dict[tuple, int] = {}
    for name, role in roles.items():
        if role == "matrix":
            buckets[tuple(params[name].shape)] = buckets.get(tuple(params[name].shape), 0) + params[name].numel()
    return Counts(total=sum(p.numel() for p in params.values()),
                  muon=sum(buckets.values()), muon_bucket=max(buckets.values(), default=0),
                  multiplied=linear, root=sum(p.numel() for p in params.values()) - len(model.blocks) * block,
                  block=block)


def counts(config: Config) -> Counts:
    return _counts(tuple(config.model.to_dict().items()))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank, by component (see the module docstring)."""

    micro_batch_size: int
    world_size: int
    bf16: bool
    weights: int
    gradients: int
    optimizer: int
    activations: int
    loss_peak: int
    buffers: int  # DDP's gradient buckets or FSDP's unsharded units
    optimizer_step: int

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.buffers
                + max(self.activations + self.loss_peak, self.optimizer_step))

    def describe(self) -> str:
        """One line: the total and its parts in GiB."""
        parts = [("weights", self.weights), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                 ("activations", self.activations), ("head and loss", self.loss_peak),
                 ("DDP/FSDP buffers", self.buffers), ("optimizer step", self.optimizer_step)]
        shown = " + ".join(f"{name} {size(value)}" for name, value in parts if value)
        return (f"{size(self.total)} per rank = {shown} (micro-batch {self.micro_batch_size}, "
                f"{self.world_size} rank(s), {'bf16 autocast' if self.bf16 else 'fp32'})")


def gib(n: int) -> str:
    return f"{n / GIB:.2f}" if n < 10 * GIB else f"{n / GIB:.1f}"


def size(n: int) -> str:
    """Bytes for people: GiB from 1 GiB up, else MiB, else KiB."""
    if n >= GIB:
        return f"{gib(n)} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{-(-n // 1024)} KiB"


def saved_activation_bytes(config: Config, micro_batch_size: int, bf16: bool) -> int:
    """Tensors the forward of one micro-batch keeps for its backward, the logits and the loss's own excepted."""
    m, t = config.model, config.train
    tokens, a, f = micro_batch_size * t.seq_len, 2 if bf16 else F32, F32
    if m.arch == "gpt2":
        per_layer, ends = 2 * f + 14 * a, f + a
    elif m.arch == "modern":
        per_layer = 6 * f + (17 if bf16 else 15) * a
        per_layer -= 0 if m.qk_norm else 2 * f  # no fp32 q and k for the norm
        per_layer -= 0 if m.qk_norm or m.rope_dims else a  # q stays a strided view: the head merge is free
        ends = 2 * f + a + (2 * f if m.embed_norm else 0)
    else:
        raise UserError(f"no memory estimate for model.arch={m.arch!r}")
    total = tokens * m.n_embd * (m.n_layer * per_layer + ends)
    if t.attention == "manual":  # + the probabilities (fp32 softmax, + its bf16 cast); q, k, v are copied as SDPA
        total += m.n_layer * micro_batch_size * m.n_head * t.seq_len**2 * (F32 + (2 if bf16 else 0))
    if bf16:
        total += 2 * counts(config).multiplied
    return total


def activation_bytes(config: Config, micro_batch_size: int, bf16: bool) -> int:
    """The saved activations plus the backward's working set: one block's MLP-hidden gradients (before and after
    the activation function) and the residual stream's gradient, twice each."""
    a = 2 if bf16 else F32
    working = micro_batch_size * config.train.seq_len * config.model.n_embd * (8 * a + 2 * F32)
    return saved_activation_bytes(config, micro_batch_size, bf16) + working


def loss_peak_bytes(config: Config, micro_batch_size: int, bf16: bool, device_type: str = "cuda") -> int:
    """The head's logits and the loss at their peak, on top of the other activations (the chunked loss's chunks
    are as large as on ``device_type``, compiled or not as ``train.compile`` says)."""
    rows, vocab, a = micro_batch_size * config.train.seq_len, config.model.padded_vocab_size, 2 if bf16 else F32
    if config.train.loss == "chunked":
        chunk = min(rows, max(1, chunk_bytes(device_type, config.train.compile) // (F32 * vocab))) * vocab * F32
        capped = bool(getattr(config.model, "logit_softcap", 0))  # a capped chunk keeps its tanh as well
        return 2 * a * rows * vocab + (CHUNKS_ALIVE + capped) * chunk
    copies = REFERENCE_LOSS_COPIES
    if getattr(config.model, "logit_softcap", 0):
        # tanh keeps its output; the algebraic form keeps x, rsqrt(x² + cap²) and s, and its backward one more
        copies += 4 if getattr(config.model, "logit_softcap_form", "tanh") == "algebraic" else 1
    return copies * F32 * rows * config.model.vocab_size


def estimate_memory(config: Config, world_size: int = 1, micro_batch_size: int | None = None,
                    bf16: bool | None = None, device_type: str = "cuda") -> MemoryEstimate:
    """The estimate for ``config`` on ``world_size`` ranks (default micro-batch: ``train.micro_batch_size``;
    ``bf16`` default: ``assumes_bf16(config)``) of ``device_type`` (default: a GPU, which it plans for)."""
    b = config.train.micro_batch_size if micro_batch_size is None else micro_batch_size
    bf16 = assumes_bf16(config) if bf16 is None else bf16
    n, o = counts(config), config.optim
    fsdp = config.train.distributed == "fsdp" and world_size > 1
    shard = world_size if fsdp else 1
    muon = n.muon if o.optimizer == "muon" else 0
    optimizer_state = 2 * F32 * (n.total - muon) + F32 * muon
    if fsdp:
        buffers = 2 * F32 * (n.root + 2 * n.block)  # unsharded parameters and their gradients in flight
    else:
        buffers = F32 * n.total if world_size > 1 else 0
    # Nesterov's updates and every bucket's orthogonalised stack (all alive until the updates are applied), plus
    # the largest bucket's working set: the stacked copy, its normalised copy and the iteration's new X.
    bucket = n.muon_bucket if o.optimizer == "muon" else 0
    step = F32 * (muon * ((2 if o.muon_nesterov else 1) + (1 if world_size > 1 else 0)) + 3 * bucket)
    if not o.fused:
        step = max(step, F32 * (n.total - muon))  # foreach AdamW: one temporary per state
    return MemoryEstimate(
        micro_batch_size=b, world_size=world_size, bf16=bf16,
        weights=-(-F32 * n.total // shard), gradients=-(-F32 * n.total // shard),
        optimizer=-(-optimizer_state // shard), activations=activation_bytes(config, b, bf16),
        loss_peak=loss_peak_bytes(config, b, bf16, device_type), buffers=buffers, optimizer_step=-(-step // shard))


def assumes_bf16(config: Config) -> bool:
    """What ``train.precision`` means for the estimate without a device at hand: ``auto`` is bf16 unless the run
    is on the CPU (where it means fp32), since GPUs are where memory is scarce."""
    return config.train.precision == "bf16" or (config.train.precision == "auto" and config.train.device != "cpu")


def fitting_micro_batch(config: Config, device_memory_bytes: int, world_size: int = 1, bf16: bool | None = None,
                        at_most: int | None = None) -> int | None:
    """The largest micro-batch (≤ ``at_most``) whose estimate fits in ``device_memory_bytes`` less ``HEADROOM``
    and that divides the total batch (``train.total_batch_tokens`` = micro-batch × seq_len × world size ×
    accumulation steps); None when none does."""
    t = config.train
    per_sequence = t.seq_len * world_size
    if t.total_batch_tokens % per_sequence:
        return None
    sequences = t.total_batch_tokens // per_sequence
    budget = device_memory_bytes * (1 - HEADROOM)
    for b in sorted((d for d in range(1, sequences + 1) if sequences % d == 0), reverse=True):
        if (at_most is None or b <= at_most) and estimate_memory(config, world_size, b, bf16).total <= budget:
            return b
    return None


def device_memory(device: torch.device | str) -> int | None:
    """Total memory of a CUDA device in bytes; None elsewhere (a CPU's batch is bounded by host RAM and time)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def memory_summary(config: Config, world_size: int, bf16: bool, device: torch.device | str) -> str:
    """The line the trainer logs before the first step; on a GPU it says when the estimate exceeds the device."""
    try:
        estimate = estimate_memory(config, world_size, bf16=bf16, device_type=torch.device(device).type)
    except UserError as error:  # an architecture without a formula: the run goes on without an estimate
        return f"no memory estimate: {error}"
    line = f"memory by the estimate: {estimate.describe()}"
    total = device_memory(device)
    if total is None:
        return line
    line += f"; the GPU has {gib(total)} GiB"
    if estimate.total > total * (1 - HEADROOM):
        fits = fitting_micro_batch(config, total, world_size, bf16)
        line += (f": likely too much — --train.micro_batch_size={fits} fits by the estimate" if fits else
                 ": likely too much even at micro-batch 1 (train.distributed = \"fsdp\" shards the model)")
    return line


def smaller_micro_batch(train, world_size: int) -> int | None:
    """Without an estimate (a CPU, an architecture without a formula): the largest micro-batch at most half the
    current one that still divides ``total_batch_tokens`` evenly (None below 1)."""
    per_sequence = train.seq_len * world_size
    return next((m for m in range(train.micro_batch_size // 2, 0, -1)
                 if train.total_batch_tokens % (m * per_sequence) == 0), None)


def out_of_memory_message(config: Config, world_size: int, bf16: bool, device: torch.device | str,
                          step: int | None = None) -> str:
    """One line for a CUDA out-of-memory error: the micro-batch that failed and the one the estimate says fits
    (without an estimate: the largest divisor at most half of it)."""
    b, total = config.train.micro_batch_size, device_memory(device)
    where = f"CUDA out of memory at micro-batch {b}" + (f" (step {step + 1})" if step is not None else "")
    keeps = f"gradient accumulation keeps the total batch of {config.train.total_batch_tokens:,} tokens"
    if total is None or config.model.arch not in ACTIVATION_FORMULAS:
        smaller = smaller_micro_batch(config.train, world_size)
        if smaller is None:
            return (f"{where}: even one sequence per GPU does not fit; use a smaller model, a shorter "
                    "--train.seq_len, or shard the model over more GPUs (--train.distributed=fsdp)")
        return f"{where}: try --train.micro_batch_size={smaller} ({keeps})"
    fits = fitting_micro_batch(config, total, world_size, bf16, at_most=b - 1)
    if fits is None:
        return (f"{where} (the estimate: {estimate_memory(config, world_size, 1, bf16).describe()} at micro-batch 1 "
                f"on a {gib(total)} GiB GPU): no micro-batch fits; shard the model with --train.distributed=fsdp "
                "on more GPUs")
    return (f"{where} on a {gib(total)} GiB GPU: --train.micro_batch_size={fits} fits by the estimate "
            f"({size(estimate_memory(config, world_size, fits, bf16).total)} per rank; {keeps})")


@contextlib.contextmanager
def explain_out_of_memory(config: Config, world_size: int, bf16: bool, device: torch.device | str,
                          step=lambda: None):
    """Turn a CUDA out-of-memory error inside the block into a ``UserError`` with ``out_of_memory_message``,
    printed by every rank (a rank's own trouble, not only the main rank's). ``step()``: the step that failed."""
    try:
        yield
    except torch.OutOfMemoryError as cause:
        error = UserError(out_of_memory_message(config, world_size, bf16, device, step()))
        error.every_rank = True
        raise error from cause


def config_comments(config: Config) -> str:
    """``--print-config``'s header: the estimate as TOML comments, for 1 rank and for 8 (FSDP shards)."""
    bf16 = assumes_bf16(config)
    precision = "bf16 autocast" if bf16 else "fp32"
    if config.train.precision == "auto":
        precision += " (train.precision = auto " + ("on a GPU)" if bf16 else "on the CPU)")
    lines = [f"# memory per rank by the estimate (gpt2forge/train/memory_estimate.py; eager, {precision}):"]
    try:
        for world in (1, 8):
            lines.append(f"#   {estimate_memory(config, world, bf16=bf16).describe()}")
    except UserError as error:
        return f"# no memory estimate: {error}\n"
    if bf16:
        fits = []
        for size in (24, 40, 80):
            b = fitting_micro_batch(config, size * GIB, 1, bf16)
            fits.append(f"{size} GiB → {b if b else 'none'}")
        lines.append(f"#   largest micro-batch that fits 1 GPU by the estimate: {', '.join(fits)}")
    return "\n".join(lines) + "\n"
