"""SIGTERM/SIGINT during training: finish the current step, save, exit (a second Ctrl-C aborts at once)."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("gpt2forge.train")


class StopFlag:
    """Set by SIGTERM/SIGINT: finish the step, save, exit. A second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s received: finishing this step, saving a checkpoint, then exiting "
                    "(Ctrl-C again to abort without saving)", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
