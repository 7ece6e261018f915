"""The time a launch has left: its steps at their measured pace, plus the evaluations and checkpoints still due,
each at its own measured cost (the step-0 evaluation measures the evaluations before the first step).
"""

from __future__ import annotations


def events_left(every: int, step: int, max_steps: int, at_end: bool) -> int:
    """How many times a cadence of ``every`` steps falls after ``step`` up to ``max_steps``; ``at_end``: it also
    falls on ``max_steps`` whatever ``every`` is (checkpoints). ``every`` 0 = never (but at the end)."""
    if step >= max_steps:
        return 0
    count = max_steps // every - step // every if every else 0
    if (at_end or every) and (not every or max_steps % every):
        count += 1
    return count


class Eta:
    """``add(kind, seconds)`` as things happen; ``seconds_left(step)`` once two steps are timed. ``cadences``:
    kind → (every, at_end), e.g. ``{"val": (250, False), "checkpoint": (1000, True)}``."""

    def __init__(self, max_steps: int, cadences: dict[str, tuple[int, bool]]) -> None:
        self.max_steps, self.cadences = max_steps, cadences
        self.total: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def add(self, kind: str, seconds: float) -> None:
        self.total[kind] = self.total.get(kind, 0.0) + seconds
        self.count[kind] = self.count.get(kind, 0) + 1

    def mean(self, kind: str) -> float:
        return self.total[kind] / self.count[kind] if self.count.get(kind) else 0.0

    def seconds_left(self, step: int) -> float | None:
        if self.count.get("step", 0) < 2:
            return None
        left = (self.max_steps - step) * self.mean("step")
        for kind, (every, at_end) in self.cadences.items():
            left += events_left(every, step, self.max_steps, at_end) * self.mean(kind)
        return left
