"""Stopping cleanly: SIGTERM/SIGINT only raise a flag; the loop saves a checkpoint at the next step boundary."""

from __future__ import annotations

import signal


class StopRequest:
    def __init__(self):
        self.signum = 0
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, _frame):
        self.signum = signum

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
