"""The training log's two outputs: the console (whatever ``sys.stdout`` is at the time) and the run's ``train.log``.

A write error in ``train.log`` (a full disk) is remembered for the loop to stop on, not printed once per line.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..files import explain

log = logging.getLogger("gpt2forge.train")


class RunLogHandler(logging.FileHandler):
    """``train.log``; ``error`` holds the first write error."""

    error: str | None = None

    def handleError(self, record) -> None:
        if self.error is None:
            exc = sys.exc_info()[1]
            self.error = explain(exc, self.baseFilename) if isinstance(exc, OSError) else f"{self.baseFilename}: {exc}"


def open_run_log(run_dir: Path) -> RunLogHandler:
    handler = RunLogHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    return handler


def close_run_log(handler: RunLogHandler | None) -> None:
    if handler is not None:
        log.removeHandler(handler)
        handler.close()


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (so redirection and test capture see the lines)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_console_logging() -> None:
    if not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
