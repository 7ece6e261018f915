"""The step guard: which optimizer steps reach the weights, and when a run is in trouble.

One stateful piece (``state_dict``/``load_state_dict``, saved as ``guard.json`` in every checkpoint), so its
history survives a resume and applies from the first step of the resumed launch. A step is skipped — its update
never reaches the weights — when its loss or gradient norm is not finite, or when it is a spike by any of these
rules (the ``train.spike_*`` settings; each 0 = off):

- *margin*: the loss is above ln(vocab) + ``spike_loss_margin``. A model that predicts uniformly scores ln(vocab),
  and a healthy run, its first step included, is never far above that; an exploded update lands far above. No
  history needed.
- *jump*: the loss is more than ``spike_jump`` × the previous applied step's loss, and more than 1 nat above it.
- *gradient*: the gradient norm is more than ``spike_grad_ratio`` × the median of the recent applied steps' norms
  (none when ``optim.grad_clip = 0``: no norm is computed then).
- *z-score*: the loss is more than ``spike_zscore`` standard deviations above the mean of the last
  ``spike_window`` applied steps' losses, once ``spike_min_history`` of them are known (llm.c's rule).

A run is *in trouble* while its latest step was skipped, or when the weights about to be saved score a spike (by
the rules that need no window) on the next batch: the trainer writes no checkpoint then — it waits for a healthy
step — so a divergence can never replace the last healthy state; ``max_bad_steps`` skipped steps in a row stop
the run. The messages say what
happened, which checkpoint is the last healthy one, the likely cause (the learning rate) and the command that
continues from that checkpoint with a lower one.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from pathlib import Path

import torch

from .. import dist
from ..config import OptimSection, TrainSection
from ..optim.schedules import ROLES

JUMP_MIN_NATS = 1.0  # the jump rule also needs the loss this far above the previous one (tiny losses vary by ratio)


class StepGuard:
    """Judges each step's loss and gradient norm, counts skipped steps, and keeps the history its rules need."""

    def __init__(self, train: TrainSection, vocab_size: int) -> None:
        self.train = train
        self.loss_bound = math.log(vocab_size) + train.spike_loss_margin if train.spike_loss_margin else math.inf
        self.losses: deque[float] = deque(maxlen=train.spike_window)  # losses of the last applied steps
        self.norms: deque[float] = deque(maxlen=train.spike_window)  # their gradient norms (when computed)
        self.bad_steps, self.first_bad_step = 0, None  # the current run of skipped steps
        self.last_bad_step: int | None = None  # the newest step that put the run in trouble
        self.last_reason = ""  # why

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"bad_steps": self.bad_steps, "first_bad_step": self.first_bad_step,
                "last_bad_step": self.last_bad_step, "last_reason": self.last_reason,
                "loss_window": list(self.losses), "norm_window": list(self.norms)}

    def load_state_dict(self, state: dict) -> None:
        """Also reads a train state of an older version, which kept the counters and the loss window there."""
        self.bad_steps = int(state.get("bad_steps", 0))
        first, last = state.get("first_bad_step"), state.get("last_bad_step")
        self.first_bad_step = None if first is None else int(first)
        self.last_bad_step = None if last is None else int(last)
        self.last_reason = str(state.get("last_reason", ""))
        self.losses = deque((float(x) for x in state.get("loss_window", [])), maxlen=self.train.spike_window)
        self.norms = deque((float(x) for x in state.get("norm_window", [])), maxlen=self.train.spike_window)

    # ---------------------------------------------------------------- the rules
    def zscore(self, loss: float) -> float | None:
        """How many standard deviations ``loss`` is above the mean of the window (None while the window holds
        fewer than ``train.spike_min_history`` losses; 0 when they are all equal)."""
        window = self.losses
        if len(window) < self.train.spike_min_history:
            return None
        mean = math.fsum(window) / len(window)
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in window) / len(window))
        return (loss - mean) / std if std > 0 else 0.0

    def judge(self, loss: float, norm: float | None, absolute_only: bool = False) -> str | None:
        """Why a step with this loss and gradient norm must not be applied, or None. ``absolute_only``: the rules
        that compare with single steps only (margin, jump), for a loss measured on one micro-batch."""
        t = self.train
        if not math.isfinite(loss) or (norm is not None and not math.isfinite(norm)):
            return f"non-finite loss {loss} or gradient norm {norm}"
        if loss > self.loss_bound:
            return (f"loss {loss:.4g} is a spike, above ln(vocab) + train.spike_loss_margin = {self.loss_bound:.3g} "
                    "(what a model that knows nothing scores, plus the margin)")
        previous = self.losses[-1] if self.losses else None
        if t.spike_jump and previous is not None and loss > t.spike_jump * previous and loss > previous + JUMP_MIN_NATS:
            return (f"loss {loss:.4g} is a spike, more than train.spike_jump={t.spike_jump:g} times the previous "
                    f"step's {previous:.4g}")
        if absolute_only:
            return None
        if t.spike_grad_ratio and norm is not None and self.norms:
            median = statistics.median(self.norms)
            if median > 0 and norm > t.spike_grad_ratio * median:
                return (f"gradient norm {norm:.4g} is a spike, more than train.spike_grad_ratio={t.spike_grad_ratio:g} "
                        f"times the median of the last {len(self.norms)} steps' ({median:.3g})")
        z = self.zscore(loss) if t.spike_zscore else None
        if z is not None and z > t.spike_zscore:
            return (f"loss {loss:.4f} is a spike, {z:.1f} standard deviations above the mean of the last "
                    f"{len(self.losses)} (train.spike_zscore={t.spike_zscore:g})")
        return None

    def record(self, step: int, loss: float, norm: float | None, reason: str | None) -> None:
        """Count step ``step`` (1-based) as applied (``reason`` None) or skipped."""
        if reason is None:
            self.losses.append(loss)
            if norm is not None:
                self.norms.append(norm)
            self.bad_steps, self.first_bad_step = 0, None
        else:
            self.bad_steps += 1
            self.first_bad_step = self.first_bad_step or step
            self.trouble(step, reason)

    def trouble(self, step: int, reason: str) -> None:
        self.last_bad_step, self.last_reason = step, reason

    def in_trouble(self, step: int) -> bool:
        """Whether step ``step`` (the latest) put the run in trouble: skipped, or its weights alarmed the probe."""
        return self.last_bad_step == step

    @property
    def stop_due(self) -> bool:
        return self.bad_steps >= self.train.max_bad_steps

    # ---------------------------------------------------------------- messages
    def skipped_line(self, step: int, reason: str) -> str:
        return f"step {step}: {reason}: step skipped, weights unchanged ({self.bad_steps} in a row)"

    def bad_steps_what(self, step: int) -> str:
        first = self.first_bad_step or step - self.bad_steps + 1
        return (f"{self.bad_steps} consecutive steps were skipped, with a non-finite loss or gradient norm or a loss "
                f"spike (first: step {first}, last: step {step}: {self.last_reason}); stopping without saving. None "
                f"of them reached the weights, which are those after step {first - 1}")

    def trouble_what(self, step: int, why: str) -> str:
        return (f"{why} at step {step} while the run is in trouble (step {self.last_bad_step}: {self.last_reason}): "
                "no checkpoint is written from that state")


def stop_advice(last_healthy: Path | None, resume_command, optim: OptimSection) -> str:
    """The end of every stop for trouble: the last healthy checkpoint, the likely cause and how to continue."""
    from ..runs import checkpoint_step

    lrs = {"lr": optim.lr, **{f"{r}_lr": getattr(optim, f"{r}_lr") for r in ROLES if getattr(optim, f"{r}_lr")}}
    named = ", ".join(f"optim.{k}={v:g}" for k, v in lrs.items())
    lower = " ".join(f"--optim.{k}={v / 2:g}" for k, v in lrs.items())
    cause = (f"A divergence is most likely the learning rate ({named}; optim.warmup_steps={optim.warmup_steps} "
             "warms it up)")
    loosen = "If the loss rose for a good reason (new data), loosen the rule that fired (train.spike_*; 0 = off)"
    if last_healthy is None:
        return f"No checkpoint of this run had been saved yet. {cause}: lower it and start the run again. {loosen}"
    return (f"The last healthy checkpoint is {last_healthy} (step {checkpoint_step(last_healthy)}). {cause}: continue "
            f"from that checkpoint with a lower one: {resume_command(last_healthy)} {lower} --train.reschedule=true. "
            f"{loosen} and resume the same way")


def poisoned_message(step: int, metrics: dict | None, advice: str) -> str:
    """The stop when an update left non-finite weights (``metrics``: that step's numbers, when known)."""
    before = ""
    if metrics:
        norm = "not computed" if metrics["grad_norm"] is None else f"{metrics['grad_norm']:.4g}"
        before = (f" (before it the loss {metrics['loss']:.4g}, gradient norm {norm} and LR {metrics['lr']:.3g} were "
                  "finite)")
    return (f"step {step}: the update left non-finite weights{before}. The run stopped without saving them: no "
            f"checkpoint holds them. {advice}")


def weights_norm(model: torch.nn.Module, sharded: bool) -> torch.Tensor:
    """A sum of the weights' norms, finite exactly when every weight is (an overflowing norm counts as
    non-finite: such weights have exploded): one fused reduction on the device, no host sync. Under FSDP each rank
    holds shards: summed over ranks (a collective)."""
    with torch.no_grad():
        local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        local = [t.detach() for t in local if t.numel()]
        device = next(model.parameters()).device
        total = (torch.stack([n.float() for n in torch._foreach_norm(local)]).sum() if local
                 else torch.zeros((), device=device))
        return dist.all_reduce(total) if sharded else total
