"""What a bench run measures: its options with per-device defaults, and the targets it is judged against."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from ..device import resolve_device
from ..errors import UserError
from ..models.gpt2 import PRESETS

SECTIONS = ("ablation", "overhead", "data", "memory")
# Results go under the current directory's out/, with the runs, not into whatever benchmarks/ is there: the
# repository's recorded results (benchmarks/results) are written only when asked for with --out.
DEFAULT_OUT = "out/bench"
# (preset, micro-batch, seq len, timed steps per round, rounds) per device kind. GPU: build-nanogpt's ablation
# batch (B=16, T=1024); CPU: the tiny preset at its full context, 0.5-1 s per step on 2 cores; Apple MPS: as the
# CPU (gpt2's fp32 manual-attention rows at B=16, T=1024 need more memory than most Macs share with their GPU).
DEFAULTS = {
    "cuda": ("gpt2", 16, 1024, 10, 5),
    "cpu": ("tiny", 8, 256, 3, 5),
    "mps": ("tiny", 8, 256, 3, 5),
    "quick": ("tiny", 2, 64, 1, 2),
}

# Targets and reference points (REFERENCE.md, at the repository root).
TARGET_MFU = 0.50  # GPT-2 124M, T=1024, bf16, compile, flash, fused AdamW on one H100
TARGET_TOKENS_PER_S = 580_000  # 50% of 989 TFLOP/s at 855 MFLOP/token
TARGET_OVERHEAD_PCT = 5.0
TARGETS = {
    "gpu": "GPT-2 124M, T=1024, bf16 + compile + flash + fused AdamW: MFU >= 50% on an H100 (~580k tokens/s); "
           "llm.c reaches ~40% (468k tokens/s/GPU on 8xH100), nanoGPT ~33%",
    "cpu": "the ablation of the tiny preset runs in CI-sized time (minutes); Trainer overhead over a bare loop < 5%",
    "overhead": "Trainer loop within 5% of a bare forward/backward/step loop",
}


@dataclass
class BenchOptions:
    preset: str
    device: str
    batch_size: int
    seq_len: int
    steps: int
    repeats: int
    sections: tuple[str, ...]
    quick: bool
    out: Path
    profile: bool

    def command(self) -> str:
        """The command line that reproduces this run, every option spelled out."""
        parts = ["gpt2forge", "bench", "--preset", self.preset, "--device", self.device,
                 "--batch-size", str(self.batch_size), "--seq-len", str(self.seq_len), "--steps", str(self.steps),
                 "--repeats", str(self.repeats), "--only", ",".join(self.sections), "--out", str(self.out)]
        parts += ["--quick"] * self.quick + ["--profile"] * self.profile
        return shlex.join(parts)


def resolve_options(args) -> BenchOptions:
    """Per-device defaults for what was not given, and checks that fail before any work starts."""
    device = resolve_device(args.device, "--device")
    preset, batch, seq_len, steps, repeats = DEFAULTS["quick" if args.quick else device]
    sections = tuple(s.strip() for s in (args.only or ",".join(SECTIONS)).split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        names = ", ".join(unknown) or "(none given)"
        raise UserError(f"--only: unknown section(s) {names}; choose from {', '.join(SECTIONS)}")
    opts = BenchOptions(
        preset=args.preset or preset, device=device, batch_size=args.batch_size or batch,
        seq_len=args.seq_len or seq_len, steps=args.steps or steps, repeats=args.repeats or repeats,
        sections=tuple(s for s in SECTIONS if s in sections), quick=args.quick, out=Path(args.out or DEFAULT_OUT),
        profile=args.profile,
    )
    if opts.preset not in PRESETS:
        raise UserError(f"--preset {opts.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    block = PRESETS[opts.preset].get("block_size", 1024)
    if opts.seq_len > block:
        raise UserError(f"--seq-len {opts.seq_len} exceeds the context length of {opts.preset} ({block})")
    return opts
