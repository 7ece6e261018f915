"""Progress for long work (prepare, eval, the quickstart's evaluation) on stderr: a live tqdm bar with ETA on a
terminal; in a log file a plain line every 30 s (carriage-return redraws would be unreadable there)."""

from __future__ import annotations

import sys


class _LogLines:
    """A file for tqdm that writes every redraw as a line of its own, skipping those that show no new progress
    (tqdm redraws the last state when it closes): progress readable in logs."""

    def __init__(self, stream) -> None:
        self.stream, self.last = stream, ""
        self.encoding = getattr(stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        progress = text.split(" [")[0]  # "desc: 40%|####      | 4/10", without the times and rate
        if text and progress != self.last:
            self.stream.write(text + "\n")
            self.last = progress

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, *, total: int | None, desc: str, unit: str, enabled: bool = True, **kwargs):
    """``iterable`` with tqdm progress on stderr (or, without one, a bar to ``update``): a live bar (ETA included)
    on a terminal; elsewhere a line every 30 s and a last one at the end. Disabled: ``iterable`` itself, or a bar
    that shows nothing. ``kwargs`` go to tqdm (``initial``, ``unit_scale``, ...)."""
    if not enabled and iterable is not None:
        return iterable
    from tqdm import tqdm

    if sys.stderr.isatty() or not enabled:
        return tqdm(iterable, total=total, desc=desc, unit=unit, mininterval=0.5, dynamic_ncols=True,
                    file=sys.stderr, disable=not enabled, **kwargs)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=_LogLines(sys.stderr), mininterval=30, ncols=100,
                ascii=True, **kwargs)
