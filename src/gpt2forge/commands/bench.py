"""``gpt2forge bench``: where the training time goes on this machine, measured side by side (``bench/``)."""

from __future__ import annotations

import argparse
import logging
import sys

from ..bench.options import DEFAULT_OUT, SECTIONS
from . import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="model preset (default: gpt2 on CUDA, tiny on CPU and MPS)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"),
                        help="default: auto (CUDA, then MPS, then CPU)")
    parser.add_argument("--batch-size", type=positive_int,
                        help="micro-batch of the ablation and overhead (CUDA 16, CPU and MPS 8)")
    parser.add_argument("--seq-len", type=positive_int, help="sequence length (CUDA 1024, CPU and MPS 256)")
    parser.add_argument("--steps", type=positive_int, help="timed steps per round (CUDA 10, CPU and MPS 3)")
    parser.add_argument("--repeats", type=positive_int, help="rounds; medians are reported (default 5)")
    parser.add_argument("--only", metavar="SECTIONS", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true",
                        help="seconds-long smoke mode (tiny model, B=2, T=64, compile rows skipped); results go to "
                             "bench-<device>-quick.*")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's top 10 kernels (CUDA) / ops (CPU) of the last ablation row "
                             "(every optimization on)")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                        help=f"directory of bench-<device>.{{json,md}} (default {DEFAULT_OUT}; the repository's "
                             "recorded results: --out benchmarks/results)")


def run(args: argparse.Namespace) -> None:
    from ..bench import resolve_options, run_bench
    from ..bench.report import to_markdown

    opts = resolve_options(args)
    log = logging.getLogger("gpt2forge.bench")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    log.info("bench: %s", opts.command())
    result = run_bench(opts)
    print(to_markdown(result))
    print(f"results written to {' and '.join(result['files'])}")
