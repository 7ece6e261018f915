"""Time to quality: how many tokens the modern recipe (and each of its parts) needs to reach the GPT-2 recipe's loss.

A CPU proxy meant to resolve effects of a few percent. Every arm is a recipe plus config overrides, so any switch
(``--arm name=--optim.x=... --model.y=...``, on top of the `modern` arm) can be measured the same way. The `modern`
arm is track 3 as published (``TRACK3``); what the shipped modern recipes adopt on top of it is an arm of its own
(``modern+normuon``).

**Setup** (``--tier``): English prose from Python's standard library (``proxy_data``: docstrings and comments),
in a lossless vocabulary of GPT-2's most frequent tokens plus bytes, so the vocabulary matrices are a minority of
the parameters; every arm's attention heads are 128 wide (the width track 3's attention scale of 0.12 is tuned for).

- ``tiny``: 4 layers × 128 wide, 2,048-token vocabulary, 2,048 tokens per step, N = 100 steps (minutes per run).
- ``larger``: 4 layers × 256 wide, 4,096-token vocabulary, 8,192 tokens per step, N = 100 steps (6–8 minutes per
  run at N on one core; baseline and modern through the whole protocol ~1.5 h on 2 cores).
- ``quick`` (``--quick``): a micro model on a few pages of text, the whole protocol in about a minute (the tests).

**Protocol**, for every arm:

1. LR sweep at N steps: one multiplier scales all of the arm's peak LRs (every role's), over ``--lr-mults``; while
   the best is at an edge, the sweep extends by ``--lr-step`` on that side (``--max-extend`` times at most). Every
   arm's schedule ends at the same floor, ``--floor`` × its peak (min_lr ∝ peak), and a warmup keeps its recipe's
   fraction of the run.
2. At the best multiplier, separate runs at N·``--fractions`` steps for every seed, each with its whole schedule
   compressed to its length (a WSD or cosine run stopped early is not a shorter run: its LR never decayed).
3. A curve L(t) = E + A·(t/N)^−α fitted per arm to the mean final losses across fractions (least squares).
   Target L* = the baseline's mean loss at N. Tokens to target = where the arm's curve reaches L*, as a fraction of
   N; its 95% interval is a bootstrap over seeds, paired: each draw resamples the seeds once for every arm and
   fraction (a seed fixes the data order, which all arms share), and refits the curves. Loss at equal tokens (N)
   with its interval likewise; differences between arms come from the same paired draws.

Losses are scored after training on the same tokens for every run, on three validation sets: the training
corpus's own (``prose``), Python's reference manual (``topics``: English the runs never saw) and, with
``--heldout``, HellaSwag's text. Each in nats per token and in bits per byte (total nats over the UTF-8 bytes
the scored tokens decode to, over ln 2: comparable across vocabularies). Runs are kept under ``--work``, named by
their resolved config, and never trained twice, so an interrupted benchmark resumes. The per-step cost is timed
apart, on the whole protocol's arms side by side (or on ``--timing-arms``, screened arms included), eager (as the
proxy trains) and compiled (as the 124M recipes train). Results: ``time-to-quality-<tier>.{json,md,png}`` and
``ablation-<tier>.md`` in ``--results``.

    python benchmarks/time_to_quality.py --tier tiny                       # all 11 arms: ~1 h on 2 cores
    python benchmarks/time_to_quality.py --tier tiny --arms baseline,modern
    python benchmarks/time_to_quality.py --tier tiny --arm "wd01=--optim.matrix_weight_decay=0.1"
    python benchmarks/time_to_quality.py --tier larger --arms baseline,modern --screen modern+normuon
    python benchmarks/time_to_quality.py --quick --work /tmp/ttq --results /tmp/ttq-results
    python benchmarks/time_to_quality.py --tier larger --arms baseline,modern --timing-only   # then --timing-from

``--screen`` trains an arm at N only, for every seed, and compares it seed by seed with the arm of the whole protocol
it builds on (``builds_on``: track 3 for a switch alone, NorMuon's arm for a switch added to NorMuon), at that arm's
best LR (``--against`` names it where an arm builds on two): a cheap first look on a tier too slow for the whole
protocol, reported apart from it. An arm of the whole protocol that builds on another arm than track 3 is compared
with that arm as well (``vs_parent``, "Against the arm it builds on" in the ablation).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_data  # a helper beside this script

from gpt2forge.config import load_config
from gpt2forge.device import hardware_summary, library_versions
from gpt2forge.errors import UserError
from gpt2forge.runs import METRICS, newest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HELLASWAG = ROOT.parent / "shared" / "data" / "hellaswag_val.jsonl"  # scored only, never trained on
log = logging.getLogger("gpt2forge.ttq")


@dataclass(frozen=True)
class Tier:
    vocab: int
    steps: int
    val_tokens: int
    overrides: dict
    about: str


def _shape(layers: int, width: int, seq: int, batch: int, micro: int) -> dict:
    return {"model.n_layer": layers, "model.n_embd": width, "model.n_head": max(1, width // 128),
            "model.block_size": seq, "train.seq_len": seq, "train.total_batch_tokens": batch,
            "train.micro_batch_size": micro}


TIERS = {
    "tiny": Tier(2048, 100, 32768, _shape(4, 128, 256, 2048, 8), "4 layers × 128 wide, heads of 128"),
    "larger": Tier(4096, 100, 65536, _shape(4, 256, 256, 8192, 16), "4 layers × 256 wide, heads of 128"),
    "quick": Tier(320, 8, 4096, {**_shape(1, 32, 32, 128, 4), "model.n_head": 1}, "1 layer × 32 wide (smoke test)"),
}


@dataclass(frozen=True)
class Arm:
    name: str
    recipe: str
    overrides: dict
    about: str


def _modern_optim(**changes) -> dict:
    """Every optimizer and schedule field of the modern recipe, as overrides for another recipe."""
    from dataclasses import asdict

    optim = asdict(load_config("quickstart-modern").optim)
    return {f"optim.{k}": v for k, v in {**optim, **changes}.items() if v is not None}


# The `modern` arm is track 3 as published, whatever the recipe adopts on top of it (the recipe's own choices are
# arms below): every arm on the modern recipe starts from these values, so the arms stay comparable with the runs
# already made (a run is cached under its resolved config, see ``run_digest``).
TRACK3_OPTIM = {"muon_normuon": False, "muon_ns": "track3", "muon_momentum_warmup_steps": 0,
                "muon_momentum_cooldown_steps": 0}
TRACK3 = {f"optim.{k}": v for k, v in TRACK3_OPTIM.items()}


# Step counts in an arm's overrides are for N steps; shorter runs scale them (see ``schedule_overrides``).
# A tied table is also the head: it takes track 3's head LR (0.004), never the untied embedding's 0.7.
ARMS = {a.name: a for a in (
    Arm("baseline", "quickstart", {}, "GPT-2 architecture, AdamW, cosine (the quickstart recipe)"),
    Arm("modern", "quickstart-modern", TRACK3, "track 3: modern architecture, Muon + AdamW, WSD, untied head"),
    Arm("modern-gpt2arch", "quickstart", _modern_optim(embedding_lr=0.004, **TRACK3_OPTIM),
        "architecture off: GPT-2's (tied head, learned positions, LayerNorm, GELU, no soft cap) with the modern "
        "optimizer and schedule"),
    Arm("modern-adamw", "quickstart-modern", {**TRACK3, "optim.optimizer": "adamw", "optim.matrix_lr": 0.003},
        "optimizer off: AdamW for the hidden matrices too (LR 0.003, the quickstart's)"),
    Arm("modern-cosine", "quickstart-modern", {**TRACK3, "optim.schedule": "cosine"},
        "schedule off: cosine decay instead of WSD (no warmup, as the recipe)"),
    Arm("modern-tied", "quickstart-modern", {**TRACK3, "model.tie_embeddings": True, "optim.embedding_lr": 0.004},
        "untied head off: one matrix for embedding and head"),
    # The next tier: each switch on top of track 3 (the `modern` arm).
    Arm("modern+momentum", "quickstart-modern", {**TRACK3, "optim.muon_momentum_start": 0.85,
                                                  "optim.muon_momentum_warmup_steps": 35,
                                                  "optim.muon_momentum_cooldown_steps": 6},
        "+ Muon momentum warmup 0.85→0.95 over 35% of the run and back down over the last 6%"),
    Arm("modern+cautious", "quickstart-modern", {**TRACK3, "optim.muon_cautious_wd": True},
        "+ cautious weight decay on Muon's matrices (only where update and weight agree in sign)"),
    Arm("modern+normuon", "quickstart-modern", {**TRACK3, "optim.muon_normuon": True},
        "+ NorMuon: per-row second-moment normalisation of Muon's output (β2 0.95)"),
    Arm("modern+scalars", "quickstart-modern", {**TRACK3, "model.residual_scalars": True, "optim.lambda_lr": 0.04},
        "+ per-layer residual and x0 scalars (x ← λr·x + λ0·x0, LR 0.04)"),
    Arm("modern+value-embeds", "quickstart-modern", {**TRACK3, "model.value_embeds": 1},
        "+ value embeddings: one gated table added to attention's values on alternating layers"),
)}


def parse_arm(text: str) -> Arm:
    """``name=--section.key=value ...``: the `modern` arm (track 3) with those overrides."""
    name, sep, rest = text.partition("=")
    overrides = {}
    for item in rest.split():
        key, eq, value = item.removeprefix("--").partition("=")
        if not eq or "." not in key:
            raise UserError(f"--arm {text!r}: {item!r} must look like --section.key=value")
        overrides[key] = value
    if not sep or not name or name in ARMS or not overrides:
        raise UserError(f"--arm {text!r} must look like NAME=--section.key=value ... with a new NAME")
    return Arm(name, "quickstart-modern", {**TRACK3, **overrides},
               "modern + " + " ".join(f"{k}={v}" for k, v in overrides.items()))


def _flags(overrides: dict) -> list[str]:
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()]


def builds_on(arm: Arm, candidates: list[Arm], chosen: str = "") -> Arm:
    """The arm among ``candidates`` that ``arm`` adds to: same recipe, every one of its changes to track 3 also
    ``arm``'s, the most of them. A screened switch is judged against what it would be added to (NorMuon's arm for a
    switch on top of NorMuon), not against track 3."""
    def said(a: Arm) -> set:
        return set(_flags(a.overrides)) - set(_flags(TRACK3))

    parents = [c for c in candidates if c.recipe == arm.recipe and said(c) <= said(arm)]
    if chosen:  # an arm that builds on two (NorMuon and momentum): the one it is to be judged against
        if chosen not in {c.name for c in parents}:
            raise UserError(f"--against {arm.name}={chosen}: {arm.name} does not build on it, or it is not in --arms")
        return next(c for c in parents if c.name == chosen)
    if not parents:
        raise UserError(f"--screen {arm.name}: no arm of the whole protocol it builds on (on its recipe, with a "
                        "subset of its changes to track 3); add that arm to --arms")
    return max(parents, key=lambda c: len(said(c)))


@dataclass
class Context:
    tier: Tier
    data: Path
    valsets: dict  # name -> {"dir", "bytes", "tokens"}
    work: Path
    steps: int
    floor: float
    common: dict = field(default_factory=dict)

    def arm_config(self, arm: Arm, extra: dict | None = None):
        return load_config(arm.recipe, _flags({**self.common, **arm.overrides, **(extra or {})}))


def lr_overrides(ctx: Context, arm: Arm, mult: float, steps: int) -> dict:
    """The arm's peak LRs (every role's) times ``mult``, the floor at ``ctx.floor`` × peak, the warmup at the
    recipe's fraction of the run."""
    base = ctx.arm_config(arm)
    o = base.optim
    out = {"optim.lr": o.lr * mult, "optim.min_lr": ctx.floor * o.lr * mult}
    for role in ("matrix", "embedding", "head", "scalar", "lambda", "value_embed"):
        value = getattr(o, f"{role}_lr")
        if value is not None:
            out[f"optim.{role}_lr"] = value * mult
    out.update(schedule_overrides(ctx, arm, steps))
    return out


def schedule_overrides(ctx: Context, arm: Arm, steps: int) -> dict:
    """A run of ``steps`` keeps its arm's schedule shape: the LR warmup at the recipe's fraction of its run, the
    Muon momentum warmup and cooldown (given for N steps in the arm) at their fractions of N."""
    def scaled(key: str) -> int:  # a step count the arm gives for N steps (a string when given by --arm)
        return round(int(arm.overrides[key]) * steps / ctx.steps)

    if "optim.warmup_steps" in arm.overrides:
        out = {"optim.warmup_steps": scaled("optim.warmup_steps")}
    else:
        recipe = load_config(arm.recipe)
        out = {"optim.warmup_steps": round(recipe.optim.warmup_steps / recipe.train.max_steps * steps)}
    for key in ("optim.muon_momentum_warmup_steps", "optim.muon_momentum_cooldown_steps"):
        if int(arm.overrides.get(key, 0)):
            out[key] = scaled(key)
    return out


def run_digest(config) -> str:
    """What a run trains, every resolved field but where it is written: an edited recipe is a new run, while an
    override that restates the recipe's value is the same one."""
    fields = config.to_dict()
    fields["log"] = {k: v for k, v in fields["log"].items() if k not in ("out_dir", "run_name")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_once(ctx: Context, arm: Arm, mult: float, steps: int, seed: int) -> dict:
    """Train one run (its own full schedule) unless it already finished; then score it on every val set."""
    from gpt2forge.train.trainer import TrainingStopped, train

    overrides = {**ctx.common, **arm.overrides, **lr_overrides(ctx, arm, mult, steps), "train.max_steps": steps,
                 "train.seed": seed}
    name = f"{arm.name}-x{mult:g}-n{steps}-s{seed}-{run_digest(load_config(arm.recipe, _flags(overrides)))}"
    run_dir = ctx.work / name
    config = load_config(arm.recipe, _flags({**overrides, "log.out_dir": ctx.work, "log.run_name": name}))
    run = {"arm": arm.name, "mult": mult, "steps": steps, "seed": seed, "run_dir": str(run_dir),
           "tokens": steps * config.train.total_batch_tokens, "diverged": (run_dir / "DIVERGED").is_file()}
    done = newest_checkpoint(run_dir)
    if not run["diverged"] and (done is None or not done.name.endswith(f"{steps:06d}")):
        log.info("training %s", name)
        try:
            train(config, resume="auto" if done is not None else None)
        except TrainingStopped as e:
            (run_dir / "DIVERGED").write_text(str(e) + "\n")
            run["diverged"] = True
    if not run["diverged"]:
        with open(run_dir / METRICS, newline="") as f:
            step_ms = [float(row["step_ms"]) for row in csv.DictReader(f) if row["step_ms"]]
        run["step_ms_median"] = statistics.median(step_ms[2:] or step_ms)  # the first steps warm up
    run["val"] = score(ctx, run)
    return run


def score(ctx: Context, run: dict) -> dict:
    """``{valset: {"loss", "bpb"}}`` of a finished run (cached in its directory); a diverged run scores inf."""
    from gpt2forge.eval.evaluate import evaluate
    from gpt2forge.files import atomic_write_json

    if run["diverged"]:
        return {name: {"loss": math.inf, "bpb": math.inf} for name in ctx.valsets}
    cache = Path(run["run_dir"]) / "ttq-scores.json"
    scores = json.loads(cache.read_text()) if cache.is_file() else {}
    for name, vs in ctx.valsets.items():
        key = f"{name}:{vs['tokens']}"
        if key not in scores:
            result = evaluate(run["run_dir"], data=vs["dir"], val_tokens=ctx.tier.val_tokens, batch_size=16,
                              seq_len=ctx.common["train.seq_len"], device="cpu", progress=False)["val"]
            assert result["tokens"] == vs["tokens"], "the val set is the one whose bytes were counted"
            scores[key] = result["loss"]
            atomic_write_json(cache, scores)
    return {name: {"loss": scores[f"{name}:{vs['tokens']}"],
                   "bpb": scores[f"{name}:{vs['tokens']}"] * vs["tokens"] / (vs["bytes"] * math.log(2))}
            for name, vs in ctx.valsets.items()}


def valset_bytes(directory: Path, val_tokens: int, seq_len: int, byte_lengths: np.ndarray) -> dict:
    """The scored target tokens of a val set (``val_batches``' own set) and the UTF-8 bytes they decode to."""
    from gpt2forge.data.loader import val_batches
    from gpt2forge.models import IGNORE_INDEX

    tokens = nbytes = 0
    for _, y in val_batches(directory, 16, seq_len, max_tokens=val_tokens):
        y = y[y != IGNORE_INDEX].numpy()
        tokens += len(y)
        nbytes += int(byte_lengths[y].sum())
    return {"dir": str(directory), "tokens": tokens, "bytes": nbytes}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_many(ctx: Context, jobs: list[tuple], workers: int, threads: int) -> list[dict]:
    """``run_once`` for each ``(arm, mult, steps, seed)``, in ``workers`` processes of ``threads`` threads each.
    On a shared 2-core machine, two one-thread runs side by side go much faster than one two-thread run (whose
    threads wait on each other whenever either is descheduled)."""
    if workers <= 1 or len(jobs) <= 1:
        return [run_once(ctx, *job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    order = sorted(range(len(jobs)), key=lambda i: -jobs[i][2])  # longest first: the pool ends together
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {i: pool.submit(run_once, ctx, *jobs[i]) for i in order}
        return [futures[i].result() for i in range(len(jobs))]


def sweep(ctx: Context, arms: list[Arm], mults: list[float], step: float, max_extend: int, seeds: list[int],
          workers: int = 1, threads: int = 1) -> dict:
    """Every arm's LR sweep at N steps (all arms' runs in one pool), each extended on the side of its best until
    the best is inside (or ``max_extend`` extensions)."""
    grids = {a.name: sorted(mults) for a in arms}
    extended, results, runs = dict.fromkeys(grids, 0), {}, {}
    while len(results) < len(arms):
        jobs = [(a, m, ctx.steps, s) for a in arms if a.name not in results for m in grids[a.name] for s in seeds
                if (a.name, m, s) not in runs]
        for job, run in zip(jobs, run_many(ctx, jobs, workers, threads)):
            runs[job[0].name, job[1], job[3]] = run
        for a in arms:
            if a.name in results:
                continue
            grid = grids[a.name]
            means = {m: statistics.mean(runs[a.name, m, s]["val"]["prose"]["loss"] for s in seeds) for m in grid}
            best = min(grid, key=lambda m: means[m])
            if extended[a.name] == max_extend or grid[0] < best < grid[-1]:
                results[a.name] = {"mults": grid, "means": means, "best": best,
                                   "interior": grid[0] < best < grid[-1], "extended": extended[a.name],
                                   "seeds": seeds}
                continue
            added = grid[0] / step if best == grid[0] else grid[-1] * step
            grids[a.name] = sorted([*grid, added])
            extended[a.name] += 1
            log.info("%s: best LR multiplier %g is at the edge of the sweep: adding %g", a.name, best, added)
    return results


def fit_curve(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """Least-squares E, A, α of L(x) = E + A·x^−α (x = tokens / N); None when a loss is not finite."""
    from scipy.optimize import least_squares

    if not np.all(np.isfinite(y)):
        return None
    lo = float(y.min())
    start = [0.8 * lo, max(float(y[np.argmin(x)]) - 0.8 * lo, 1e-3) * float(x.min()) ** 0.5, 0.5]
    result = least_squares(lambda p: p[0] + p[1] * x ** -p[2] - y, start, bounds=([0, 0, 0.02], [lo, np.inf, 4]))
    return tuple(float(v) for v in result.x)


def interval(values) -> list[float]:
    """The 95% percentile interval of bootstrap draws; a ratio of two curves that never reach the target
    (inf / inf) counts as never."""
    values = np.nan_to_num(np.array(values, dtype=float), nan=np.inf, posinf=np.inf)
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def tokens_to(params, target: float) -> float:
    """Fraction of N at which the fitted curve reaches ``target`` (inf when it never does)."""
    if params is None:
        return math.inf
    e, a, alpha = params
    return (a / (target - e)) ** (1 / alpha) if target > e and a > 0 else math.inf


def analyse(arm_runs: dict, fractions: list[float], valset: str, draws: int, rng, parents: dict | None = None) -> dict:
    """Per arm: mean losses per fraction, the fit, tokens to the baseline's loss at N and the loss at N, each with
    a bootstrap interval over seeds; ``valset`` picks the validation set. Each arm is compared with the modern
    recipe (``vs_modern``) and, where ``parents`` names another arm it builds on (a switch added to NorMuon),
    with that arm too (``vs_parent``), from the same paired draws."""
    parents = {arm: p for arm, p in (parents or {}).items() if p in arm_runs and p != "modern"}
    refs = ({"modern"} & set(arm_runs)) | set(parents.values())

    def table(runs, pick):  # fraction -> list of per-seed losses, seeds resampled by pick
        out = {}
        for f, rs in sorted(runs.items()):
            losses = np.array([r["val"][valset]["loss"] for r in rs])
            out[f] = losses[pick(len(losses))]
        return out

    def estimate(pick):
        tables = {arm: table(runs, pick) for arm, runs in arm_runs.items()}
        target = float(np.mean(tables["baseline"][1.0]))
        out = {"target": target}
        for arm, t in tables.items():
            fr = np.array(sorted(t))
            means = np.array([np.mean(t[f]) for f in fr])
            params = fit_curve(fr, means)
            out[arm] = {"fit": params, "tokens_to_target": tokens_to(params, target), "loss_at_n": float(means[-1])}
        for ref in refs:  # a nearer target for the next tier: the loss at N of the arm a switch is added to
            for arm in tables:
                out[arm].setdefault("tokens_to_arm", {})[ref] = tokens_to(out[arm]["fit"], out[ref]["loss_at_n"])
        return out

    def versus(arm: str, ref: str) -> dict:
        def near(e):  # tokens to the reference's loss at N, over its own curve's (near 1: fit bias cancels)
            return e[arm]["tokens_to_arm"][ref] / e[ref]["tokens_to_arm"][ref]
        return {"against": ref, "loss_at_n": point[arm]["loss_at_n"] - point[ref]["loss_at_n"],
                "loss_at_n_interval": interval([b[arm]["loss_at_n"] - b[ref]["loss_at_n"] for b in boot]),
                "tokens_ratio": point[arm]["tokens_to_target"] / point[ref]["tokens_to_target"],
                "tokens_ratio_interval": interval([b[arm]["tokens_to_target"] / b[ref]["tokens_to_target"]
                                                   for b in boot]),
                "tokens_ratio_near": near(point), "tokens_ratio_near_interval": interval([near(b) for b in boot])}

    # Paired over seeds: one resample of the seeds per draw, shared by every arm and fraction. A seed fixes the
    # data order (and the initial state of the modules arms share), so arms compared at the same seeds differ
    # by less than their own spreads: resampling each arm alone would hide effects of a few hundredths.
    seeds = len(next(iter(next(iter(arm_runs.values())).values())))
    point = estimate(lambda n: np.arange(n))
    boot = []
    for _ in range(draws):
        draw = rng.integers(0, seeds, seeds)
        boot.append(estimate(lambda n, d=draw: d if n == seeds else rng.integers(0, n, n)))

    result = {"target": point["target"], "target_interval": interval([b["target"] for b in boot]), "arms": {}}
    for arm, runs in arm_runs.items():
        p = point[arm]
        rows = []
        for f, rs in sorted(runs.items()):
            losses = [r["val"][valset]["loss"] for r in rs]
            bpbs = [r["val"][valset]["bpb"] for r in rs]
            rows.append({"fraction": f, "steps": rs[0]["steps"], "tokens": rs[0]["tokens"], "seeds": len(rs),
                         "loss": [statistics.mean(losses), statistics.stdev(losses) if len(rs) > 1 else 0.0],
                         "bpb": [statistics.mean(bpbs), statistics.stdev(bpbs) if len(rs) > 1 else 0.0]})
        result["arms"][arm] = {
            "rows": rows, "fit": p["fit"], "loss_at_n": p["loss_at_n"],
            "loss_at_n_interval": interval([b[arm]["loss_at_n"] for b in boot]),
            "tokens_to_target": p["tokens_to_target"],
            "tokens_to_target_interval": interval([b[arm]["tokens_to_target"] for b in boot]),
            "extrapolated": not (min(fractions) <= p["tokens_to_target"] <= max(fractions)),
            "vs_modern": versus(arm, "modern") if "modern" in refs and arm != "modern" else None,
            "vs_parent": versus(arm, parents[arm]) if arm in parents else None,
        }
    return result


def screen_at_n(runs: list[dict], base: list[dict], valsets: dict, draws: int, rng) -> dict:
    """An arm's loss at N minus the loss of the arm it builds on, seed by seed (same seeds, same data order), with a
    paired bootstrap interval of the mean difference: ``{"val": {valset: {"loss", "delta", "interval"}}}``."""
    out = {}
    for name in valsets:
        arm = np.array([r["val"][name]["loss"] for r in runs])
        delta = arm - np.array([r["val"][name]["loss"] for r in base])
        boot = [float(np.mean(delta[rng.integers(0, len(delta), len(delta))])) for _ in range(draws)]
        out[name] = {"loss": float(np.mean(arm)), "delta": float(np.mean(delta)), "interval": interval(boot)}
    return {"val": out}


def parameter_split(ctx: Context, arm: Arm) -> dict:
    """Parameters of the arm's model: all, and those in vocabulary-sized matrices (embedding, head)."""
    from gpt2forge.models import build_model

    model = build_model(ctx.arm_config(arm).model)
    total = sum(p.numel() for p in model.parameters())
    vocab = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p.shape[0] == model.config.padded_vocab_size)
    return {"total": total, "vocab_matrices": vocab, "other": total - vocab}


def step_cost(ctx: Context, arms: list[Arm], rounds: int, steps: int, compile: bool = False) -> dict:
    """Milliseconds per step of each arm (the baseline among them), timed in blocks whose order reverses every round
    (ABC CBA …) on the same machine, so drifting foreign load hits all alike: the median of each, its ratio to the
    baseline's, and how many other cores were busy. ``compile``: the model through torch.compile, as the 124M
    recipes train (the proxy's runs themselves are eager)."""
    from gpt2forge.bench.measure import timed
    from gpt2forge.train.trainer import Trainer

    trainers, times, others = {}, {a.name: [] for a in arms}, {a.name: [] for a in arms}
    try:
        for arm in arms:
            overrides = {**ctx.common, **arm.overrides, "log.out_dir": ctx.work / "timing", "log.run_name": arm.name,
                         "train.max_steps": 1_000_000, "train.restart": True, "log.every": 1_000_000,
                         "train.compile": compile}
            trainers[arm.name] = Trainer(load_config(arm.recipe, _flags(overrides)))
            trainers[arm.name].run(until=2)  # warm up (and compile)
        for r in range(rounds):
            for name in list(trainers) if r % 2 == 0 else list(trainers)[::-1]:
                trainer = trainers[name]
                ms, busy = timed(lambda t=trainer: t.run(until=t.step + steps), 1, trainer.parallel.device)
                times[name].append(ms / steps)
                others[name].append(busy)
    finally:
        for trainer in trainers.values():
            trainer.close()
    medians = {name: statistics.median(ms) for name, ms in times.items()}
    ratios = {name: ms / medians["baseline"] for name, ms in medians.items() if name != "baseline"}
    return {"ms_per_step": medians, "samples": times, "other_cores": others, "ratios": ratios,
            "how": f"{'compiled' if compile else 'eager'}; {rounds} rounds of {steps} steps each, order reversed "
                   "every round, median per arm"}


def step_costs(ctx: Context, arms: list[Arm], quick: bool) -> dict:
    """``step_cost`` eager (as the proxy trains) and compiled (as the 124M recipes train)."""
    rounds, block = (2, 2) if quick else (4, 3)
    return {mode: step_cost(ctx, arms, rounds, block, compile) for mode, compile in (("eager", False),
                                                                                     ("compiled", True))}


def provenance() -> dict:
    """What every results file records about how and where it was made."""
    return {"command": " ".join(["python", *sys.argv]),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "hardware": hardware_summary("cpu"),
            "versions": library_versions()}


def step_cost_lines(costs: dict) -> list[str]:
    lines = []
    for c in costs.values():
        arms = ", ".join(f"{name} {c['ms_per_step'][name]:.0f} ms = **{r:.2f}×**" for name, r in c["ratios"].items())
        lines.append(f"- Wall-clock per step on this CPU ({c['how']}): baseline {c['ms_per_step']['baseline']:.0f} "
                     f"ms, {arms} (target ≤ 1.3×).")
    return lines


def arms_to_time(names: str, whole: list[Arm], screened: list[Arm]) -> list[Arm]:
    """The arms ``--timing-arms`` names (comma-separated; empty: every arm of the whole protocol), the baseline
    always among them, in the order they were given to the benchmark."""
    wanted = {n for n in names.split(",") if n}
    chosen = [a for a in whole + screened if a.name == "baseline" or (a.name in wanted if wanted else a in whole)]
    if unknown := wanted - {a.name for a in chosen}:
        raise UserError(f"--timing-arms {names}: {', '.join(sorted(unknown))} not among the arms of --arms, --arm "
                        "or --screen")
    return chosen


def earlier_step_cost(path: Path, tier: str) -> dict:
    """The per-step comparisons of an earlier results file (eager, and compiled where it has one), marked as
    taken from it."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--timing-from {path}: cannot read it ({e})") from None
    if earlier.get("tier") != tier or not earlier.get("step_cost"):
        raise UserError(f"--timing-from {path}: not a {tier}-tier result with a per-step timing")
    costs = earlier["step_cost"]
    if "ms_per_step" in costs:  # written before the compiled timing: one eager comparison of two arms
        costs = {"eager": {**costs, "ratios": {"modern": costs["ratio"]}}}
    return {mode: {**c, "how": f"{c['how']}; measured at {earlier['time']}"} for mode, c in costs.items()}


def _ci(value, interval, fmt="{:.4f}") -> str:
    return f"{fmt.format(value)} [{fmt.format(interval[0])}, {fmt.format(interval[1])}]"


def _frac(value, interval) -> str:
    def f(v):
        return "never" if not math.isfinite(v) else f"{v:.3f}"
    return f"{f(value)} [{f(interval[0])}, {f(interval[1])}]"


def to_markdown(result: dict) -> str:
    tier, a = result["tier"], result["analysis"]
    prose = a["prose"]
    lines = [
        f"# Time to quality on the CPU proxy: {tier} tier", "",
        f"- when: {result['time']}; command: `{result['command']}`",
        f"- machine: {result['hardware']['cpu']} ({result['hardware']['cores_available']} cores, shared with other "
        f"jobs); torch {result['versions'].get('torch')}",
        f"- model: {result['tier_about']}; vocabulary {result['vocab']:,} (GPT-2's most frequent tokens of the "
        f"training text + bytes, lossless); N = {result['steps']} steps × {result['tokens_per_step']:,} tokens = "
        f"{result['steps'] * result['tokens_per_step']:,} tokens",
        f"- data: {result['data_note']}",
        f"- seeds {result['seeds']} at every arm's best LR; sweep seeds {result['sweep_seeds']}; fractions of N "
        f"{result['fractions']}; LR floor {result['floor']:g} × peak; {result['bootstrap']} bootstrap draws",
        "- validation: " + "; ".join(f"`{n}` {v['tokens']:,} tokens = {v['bytes']:,} bytes"
                                      for n, v in result["valsets"].items()),
    ]
    if result.get("note"):
        lines += [f"- scope: {result['note']}"]
    lines += ["", "## Arms", "", "| arm | what | parameters (vocab matrices / other) |", "|---|---|---:|"]
    for name, arm in result["arms"].items():
        p = arm["params"]
        lines.append(f"| {name} | {arm['about']} | {p['total']:,} ({p['vocab_matrices']:,} / {p['other']:,}, "
                     f"{p['other'] / p['total']:.0%} other) |")
    lines += ["", "## LR sweeps at N (one multiplier on every peak LR of the arm)", "",
              "| arm | multiplier: mean prose val loss | best | inside the sweep? |", "|---|---|---:|:---:|"]
    for name, arm in result["arms"].items():
        s = arm["sweep"]
        cells = ", ".join(f"{m:g}: {'diverged' if not math.isfinite(s['means'][m]) else format(s['means'][m], '.4f')}"
                          for m in s["mults"])
        extended = f" (extended {s['extended']}×)" if s["extended"] else ""
        lines.append(f"| {name} | {cells} | {s['best']:g} | {'yes' if s['interior'] else 'NO'}{extended} |")
    lines += ["", "## Final losses at the best LR (separate runs, each with its own schedule; mean ± sd over seeds)",
              "", "| arm | fraction | steps | tokens | " + " | ".join(f"{n} nats | {n} bpb" for n in a) + " |",
              "|---|---:|---:|---:|" + "---:|---:|" * len(a)]
    for name in result["arms"]:
        for i, row in enumerate(prose["arms"][name]["rows"]):
            cells = []
            for vs in a.values():
                r = vs["arms"][name]["rows"][i]
                cells += [f"{r['loss'][0]:.4f} ± {r['loss'][1]:.4f}", f"{r['bpb'][0]:.4f} ± {r['bpb'][1]:.4f}"]
            lines.append(f"| {name} | {row['fraction']:g} | {row['steps']} | {row['tokens']:,} | " + " | ".join(cells)
                         + " |")
    lines += ["", "## Fitted curves and tokens to target", "",
              "L(t) = E + A·(t/N)^−α per arm, fitted to the mean losses above; target L* = the baseline's mean loss "
              "at N on the same set. Tokens to target as a fraction of N, [95% bootstrap interval over seeds]; "
              "'never': the curve levels off above L*. In bits per byte the fractions are the same (one constant "
              "per val set).", "",
              "| val set | L* (nats) | arm | E, A, α | tokens to L* (fraction of N) | loss at N (nats) |",
              "|---|---:|---|---|---:|---:|"]
    for vname, vs in a.items():
        for name, arm in vs["arms"].items():
            fit = arm["fit"]
            fit_s = "–" if fit is None else f"{fit[0]:.3f}, {fit[1]:.3f}, {fit[2]:.2f}"
            flag = " (extrapolated)" if arm["extrapolated"] and math.isfinite(arm["tokens_to_target"]) else ""
            lines.append(f"| {vname} | {_ci(vs['target'], vs['target_interval'])} | {name} | {fit_s} | "
                         f"{_frac(arm['tokens_to_target'], arm['tokens_to_target_interval'])}{flag} | "
                         f"{_ci(arm['loss_at_n'], arm['loss_at_n_interval'])} |")
    m = prose["arms"].get("modern")
    lines += ["", "## Result", ""]
    if m is not None:
        t = m["tokens_to_target"]
        extra = (", extrapolated" if m["extrapolated"] else "") + (f"; 1/{1 / t:.2f}" if 0 < t < math.inf else "")
        lines.append("- **The modern recipe reaches the baseline's loss at N in "
                     f"{_frac(t, m['tokens_to_target_interval'])} of the tokens** (prose val{extra}).")
        for vname, vs in a.items():
            mm, b = vs["arms"]["modern"], vs["arms"]["baseline"]
            k = result["valsets"][vname]["tokens"] / (result["valsets"][vname]["bytes"] * math.log(2))
            gap = b["loss_at_n"] - mm["loss_at_n"]
            lines.append(f"- {vname}: loss at N baseline {b['loss_at_n']:.4f}, modern {mm['loss_at_n']:.4f} nats/token "
                         f"({gap:+.4f} nats = {gap * k:+.4f} bits/byte in the modern recipe's favour); tokens to "
                         f"the baseline's loss {_frac(mm['tokens_to_target'], mm['tokens_to_target_interval'])}.")
    lines += step_cost_lines(result.get("step_cost") or {})
    lines += ["", f"![validation loss against tokens]({result['png']})", ""]
    return "\n".join(lines)


def ablation_markdown(result: dict) -> str:
    a = result["analysis"]
    names = list(a)  # the val sets
    lines = [f"# Ablation on the CPU proxy: {result['tier']} tier", "",
             f"Each arm against the full modern recipe, every arm LR-tuned on its own (`time-to-quality-"
             f"{result['tier']}.md` has the sweeps, the runs and the fits). Seeds {result['seeds']}; intervals are "
             f"95% bootstrap intervals over seeds ({result['bootstrap']} draws). Δ loss > 0: the arm is worse than "
             "the modern recipe; tokens ratio > 1: it needs more tokens than the modern recipe to reach the "
             "baseline's loss at N (far target, ~0.2 N) or the modern recipe's own loss at N (near target, ~N: "
             "the one a next-tier switch is judged by).", ""]
    if result.get("note"):
        lines += [f"Scope: {result['note']}", ""]
    for vname, vs in a.items():
        k = result["valsets"][vname]["tokens"] / (result["valsets"][vname]["bytes"] * math.log(2))
        lines += [f"## Validation set `{vname}` (L* = {vs['target']:.4f} nats)", "",
                  "| arm | what | loss at N (nats) | Δ vs modern (nats) | Δ (bits/byte) | tokens to L* (× N) | "
                  "tokens vs modern, to L* | tokens vs modern, to modern's loss at N |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, arm in vs["arms"].items():
            v = arm["vs_modern"]
            delta = "–" if v is None else _ci(v["loss_at_n"], v["loss_at_n_interval"], "{:+.4f}")
            dbpb = "–" if v is None else f"{v['loss_at_n'] * k:+.4f}"
            ratio = "–" if v is None else _frac(v["tokens_ratio"], v["tokens_ratio_interval"])
            near = "–" if v is None else _frac(v["tokens_ratio_near"], v["tokens_ratio_near_interval"])
            lines.append(f"| {name} | {result['arms'][name]['about']} | "
                         f"{_ci(arm['loss_at_n'], arm['loss_at_n_interval'])} | {delta} | {dbpb} | "
                         f"{_frac(arm['tokens_to_target'], arm['tokens_to_target_interval'])} | {ratio} | {near} |")
        lines.append("")
    built = {n: arm["vs_parent"]["against"] for n, arm in a[names[0]]["arms"].items() if arm.get("vs_parent")}
    if built:
        lines += ["## Against the arm it builds on", "",
                  "A switch added to an arm that is itself more than track 3 (NorMuon, the recipe as shipped), judged "
                  "against that arm: Δ = the arm's loss at N minus that arm's, and tokens to that arm's loss at N "
                  "relative to its own, from the same paired draws as above.", "",
                  "| arm | against | " + " | ".join(f"{n}: Δ (nats)" for n in names) + f" | tokens ({names[0]}) |",
                  "|---|---|" + "---:|" * len(names) + "---:|"]
        for name, against in built.items():
            cells = [_ci(a[n]["arms"][name]["vs_parent"]["loss_at_n"],
                         a[n]["arms"][name]["vs_parent"]["loss_at_n_interval"], "{:+.4f}") for n in names]
            v = a[names[0]]["arms"][name]["vs_parent"]
            lines.append(f"| {name} | {against} | " + " | ".join(cells) + " | "
                         f"{_frac(v['tokens_ratio_near'], v['tokens_ratio_near_interval'])} |")
        lines.append("")
    if result.get("screen"):
        lines += ["## Screened at N only", "",
                  "Trained at N with the best LR multiplier of the arm it builds on (not swept for the arm), every "
                  "seed; Δ = the arm's loss at N minus that arm's, seed by seed, mean [95% paired bootstrap "
                  "interval]. No curve, so no tokens-to-target: a screen, not the whole protocol.", "",
                  "| arm | what | against | LR multiplier | " + " | ".join(f"{n}: loss · Δ (nats)" for n in names)
                  + " |", "|---|---|---|---:|" + "---:|" * len(names)]
        for name, sc in result["screen"].items():
            cells = [f"{sc['val'][n]['loss']:.4f} · {_ci(sc['val'][n]['delta'], sc['val'][n]['interval'], '{:+.4f}')}"
                     for n in names]
            lines.append(f"| {name} | {sc['about']} | {sc['against']} | {sc['mult']:g} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    names = list(result["analysis"])
    fig = Figure(figsize=(6 * len(names), 4.2), dpi=120, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    from matplotlib import colormaps

    colors = [colormaps["tab20"](i % 20) for i in range(len(result["arms"]))]  # one per arm, however many
    for ax, vname in zip(axes, names):
        vs = result["analysis"][vname]
        ax.axhline(vs["target"], color="#555555", linestyle="--", linewidth=1, label=f"L* = {vs['target']:.3f}")
        for color, (name, arm) in zip(colors, vs["arms"].items()):
            x = np.array([r["fraction"] for r in arm["rows"]])
            ax.errorbar(x, [r["loss"][0] for r in arm["rows"]], yerr=[r["loss"][1] for r in arm["rows"]], fmt="o",
                        color=color, capsize=3, label=name)
            if arm["fit"] is not None:
                xs = np.linspace(x.min() * 0.8, 1.05, 100)
                ax.plot(xs, arm["fit"][0] + arm["fit"][1] * xs ** -arm["fit"][2], color=color, linewidth=1)
        ax.set_xlabel(f"training tokens / N (N = {result['steps'] * result['tokens_per_step']:,})")
        ax.set_ylabel("final validation loss (nats/token)")
        ax.set_title(f"{result['tier']} tier, val set `{vname}`")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path)


def write_step_cost(args, tier: str, costs: dict) -> int:
    """``--timing-only``'s result: ``step-cost-<tier>.json`` in ``--results``, readable by ``--timing-from``."""
    from gpt2forge.files import atomic_write_text

    result = {"benchmark": "per-step cost (CPU proxy)", "tier": tier, **provenance(), "step_cost": costs}
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / f"step-cost-{tier}.json", json.dumps(result, indent=1) + "\n")
    print("\n".join(step_cost_lines(costs)))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", choices=["tiny", "larger"], default="tiny")
    parser.add_argument("--quick", action="store_true", help="micro model on a few pages: the protocol in ~a minute")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"built-in arms to run (of {', '.join(ARMS)})")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="an extra arm: the modern arm (track 3) with these overrides, e.g. 'x=--optim.foo=1'")
    parser.add_argument("--screen", default="", metavar="ARMS",
                        help="arms (built-in names or --arm names) only screened: trained at N, every seed, at the "
                             "best LR of the arm they build on, and compared with it at N (no sweep, no curve; for a "
                             "tier too slow for the whole protocol)")
    parser.add_argument("--against", action="append", default=[], metavar="ARM=PARENT",
                        help="the whole-protocol arm an arm (screened or not) is compared with, where it builds on "
                             "more than one (default: the one with most of its changes to track 3)")
    parser.add_argument("--steps", type=int, help="N (default: the tier's)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--sweep-seeds", type=int, default=1, help="how many of the seeds the LR sweep runs")
    parser.add_argument("--lr-mults", default="0.5,1,2", help="initial LR multipliers of the sweep")
    parser.add_argument("--lr-step", type=float, default=2.0, help="factor of each extension of the sweep")
    parser.add_argument("--max-extend", type=int, default=3)
    parser.add_argument("--fractions", default="1,0.5,0.35,0.2,0.1", help="fractions of N run at the best LR (1 first)")
    parser.add_argument("--floor", type=float, default=0.1, help="every schedule's floor, as a fraction of its peak")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--heldout", type=Path, default=HELLASWAG if HELLASWAG.is_file() else None,
                        help="HellaSwag val jsonl: its text is a third validation set (default: shared/data's)")
    parser.add_argument("--workers", type=int, default=2, help="runs trained side by side (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--no-timing", action="store_true",
                        help="skip the per-step wall-clock comparisons (eager and compiled)")
    parser.add_argument("--timing-arms", default="", metavar="ARMS",
                        help="arms whose per-step cost is timed, screened ones included (default: every arm of the "
                             "whole protocol); the baseline always is")
    parser.add_argument("--timing-only", action="store_true",
                        help="train nothing: time the arms (--timing-arms) and write step-cost-<tier>.json, for "
                             "--timing-from (timing wants a quiet machine, training does not)")
    parser.add_argument("--timing-from", type=Path, metavar="JSON",
                        help="take the per-step comparison from an earlier results file of the same tier (measured "
                             "on a quiet machine) instead of timing again")
    parser.add_argument("--note", default="", help="what was (not) run, written into the results")
    parser.add_argument("--work", type=Path, default=Path("out/time-to-quality"), help="where runs are kept")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    _init_worker(args.threads)
    tier_name = "quick" if args.quick else args.tier
    tier = TIERS[tier_name]
    seeds = [int(x) for x in args.seeds.split(",")]
    fractions = sorted({float(x) for x in args.fractions.split(",")} | {1.0}, reverse=True)
    if len(fractions) < 3:
        raise UserError("--fractions: the curve has 3 parameters; give at least 3 fractions (1 included)")
    if not 1 <= args.sweep_seeds <= len(seeds):
        raise UserError(f"--sweep-seeds must be between 1 and the {len(seeds)} --seeds")
    arms = [ARMS[n] if n in ARMS else None for n in args.arms.split(",")]
    if None in arms or "baseline" not in args.arms.split(","):
        raise UserError(f"--arms: choose from {', '.join(ARMS)}, baseline included")
    arms += [parse_arm(text) for text in args.arm]
    names = [n for n in args.screen.split(",") if n]
    screened = [a for a in arms if a.name in names] + [ARMS[n] for n in names if n in ARMS and ARMS[n] not in arms]
    if len(screened) < len(names):
        raise UserError(f"--screen {args.screen}: name built-in arms or --arm names")
    arms = [a for a in arms if a not in screened]
    against = dict(text.partition("=")[::2] for text in args.against)
    if unknown := set(against) - {a.name for a in arms + screened}:
        raise UserError(f"--against: {', '.join(sorted(unknown))} is neither in --arms nor --arm nor --screen")
    base = {arm.name: builds_on(arm, arms, against.get(arm.name, "")) for arm in screened}  # fails before training
    has_track3 = any(c.name == "modern" for c in arms)  # every switch builds on track 3 at least
    parents = {arm.name: builds_on(arm, [c for c in arms if c is not arm], against.get(arm.name, "")).name
               for arm in arms if has_track3 and arm.recipe == ARMS["modern"].recipe and arm.name != "modern"}
    timing_arms = arms_to_time(args.timing_arms, arms, screened)
    work = args.work / tier_name
    if args.quick:  # a few of the reference manual's pages: real English, tokenized in a second
        topics = proxy_data.topics_documents()
        documents = {"prose": topics[:60], "topics": topics[60:70]}
        meta = proxy_data.build(work / "data", tier.vocab, 4096, documents=documents)
        data_note = "quick: 60 pages of pydoc's topics as the training text, 10 others as `topics`"
    else:
        meta = proxy_data.build(work / "data", tier.vocab, 100_000, args.heldout)
        data_note = (f"English prose of Python {sys.version.split()[0]}'s standard library (docstrings and "
                     f"comments, `benchmarks/proxy_data.py`): {meta['stats']['prose_train']['bytes']:,} bytes of "
                     f"training text = {meta['stats']['prose_train']['proxy_tokens']:,} proxy tokens "
                     f"({meta['stats']['prose_train']['bytes_per_proxy_token']:.2f} bytes/token); `topics` is "
                     "pydoc's reference manual, never trained on" +
                     ("; `hellaswag` is HellaSwag's contexts + gold endings, never trained on" if args.heldout else ""))
    common = {**tier.overrides, "model.vocab_size": meta["size"], "model.vocab_multiple": 1,
              "data.dir": work / "data" / "prose", "eval.val_every": 0, "eval.sample_every": 0,
              "eval.hellaswag_every": 0, "checkpoint.every": 0, "checkpoint.keep_last": 1, "log.every": 25,
              "train.device": "cpu", "train.precision": "fp32", "train.compile": False}
    byte_lengths = np.array(meta["byte_lengths"])
    valsets = {name: valset_bytes(work / "data" / name, tier.val_tokens, tier.overrides["train.seq_len"], byte_lengths)
               for name in proxy_data.SETS if f"{name}_val" in meta["stats"]}  # the sets the data was built with
    ctx = Context(tier, work / "data", valsets, work, args.steps or tier.steps, args.floor, common)
    if args.timing_only:
        return write_step_cost(args, tier_name, step_costs(ctx, timing_arms, args.quick))

    steps = {f: max(1, round(ctx.steps * f)) for f in fractions}
    if len(set(steps.values())) < len(steps):
        raise UserError(f"--fractions {args.fractions}: two of them round to the same number of the {ctx.steps} steps")
    sweep_seeds = seeds[: args.sweep_seeds]
    sweeps = sweep(ctx, arms, [float(x) for x in args.lr_mults.split(",")], args.lr_step, args.max_extend,
                   sweep_seeds, args.workers, args.threads)
    jobs = [(arm, sweeps[arm.name]["best"], steps[f], seed) for arm in arms for f in fractions for seed in seeds]
    done = run_many(ctx, jobs, args.workers, args.threads)
    arm_runs = {arm.name: {f: [r for job, r in zip(jobs, done) if job[0] is arm and job[2] == steps[f]]
                           for f in fractions} for arm in arms}
    result_arms = {arm.name: {"about": arm.about, "recipe": arm.recipe, "overrides": arm.overrides,
                              "params": parameter_split(ctx, arm), "sweep": sweeps[arm.name]} for arm in arms}
    rng = np.random.default_rng(0)
    analysis = {name: analyse(arm_runs, fractions, name, args.bootstrap, rng, parents) for name in valsets}
    screen = {}
    if screened:
        mult = {arm.name: sweeps[base[arm.name].name]["best"] for arm in screened}
        jobs = [(arm, mult[arm.name], ctx.steps, seed) for arm in screened for seed in seeds]
        done = run_many(ctx, jobs, args.workers, args.threads)
        for arm in screened:
            runs = [r for job, r in zip(jobs, done) if job[0] is arm]
            screen[arm.name] = {"about": arm.about, "overrides": arm.overrides, "against": base[arm.name].name,
                                "mult": mult[arm.name], "runs": runs,
                                **screen_at_n(runs, arm_runs[base[arm.name].name][1.0], valsets, args.bootstrap, rng)}
    first = ctx.arm_config(ARMS["baseline"])
    out = args.results / f"time-to-quality-{tier_name}"
    result = {
        "benchmark": "time to quality (CPU proxy)", "tier": tier_name, "tier_about": tier.about,
        **provenance(), "note": args.note, "steps": ctx.steps, "tokens_per_step": first.train.total_batch_tokens,
        "vocab": meta["size"], "data_note": data_note, "data_stats": meta["stats"], "seeds": seeds,
        "sweep_seeds": sweep_seeds, "fractions": fractions, "floor": args.floor, "bootstrap": args.bootstrap,
        "valsets": valsets, "arms": result_arms, "analysis": analysis, "screen": screen,
        "runs": [r for runs in arm_runs.values() for rs in runs.values() for r in rs],
        "step_cost": (earlier_step_cost(args.timing_from, tier_name) if args.timing_from else None if args.no_timing
                      else step_costs(ctx, timing_arms, args.quick)),
        "png": out.with_suffix(".png").name,
    }
    for s in result_arms.values():  # JSON keys are strings
        s["sweep"]["means"] = {f"{m:g}": v for m, v in s["sweep"]["means"].items()}
    args.results.mkdir(parents=True, exist_ok=True)
    plot(result, out.with_suffix(".png"))
    from gpt2forge.files import atomic_write_text

    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=1, default=str) + "\n")
    for s in result_arms.values():
        s["sweep"]["means"] = {float(m): v for m, v in s["sweep"]["means"].items()}
    atomic_write_text(out.with_suffix(".md"), to_markdown(result))
    atomic_write_text(args.results / f"ablation-{tier_name}.md", ablation_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
