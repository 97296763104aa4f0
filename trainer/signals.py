"""Stopping cleanly: SIGTERM/SIGINT only raise a flag; the loop saves a checkpoint at the next step boundary.

A launcher (`accelerate launch`, torchrun) that is itself sent SIGTERM, as a cluster scheduler does, exits at once
and leaves its training process running unsupervised. `follow_launcher` makes the kernel send the trainer
SIGTERM when its launcher dies, so it takes the same path: checkpoint, exit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# environment a launcher leaves in its training processes (accelerate launch, torchrun)
LAUNCHER_MARKERS = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID", "LOCAL_RANK")


class StopRequest:
    def __init__(self):
        self.signum = 0
        self._previous = {
            s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)
        }

    def _handle(self, signum, _frame):
        self.signum = signum

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def follow_launcher() -> bool:
    """Under a launcher on Linux, get SIGTERM when the launcher dies. Returns whether it is armed."""
    if not sys.platform.startswith("linux") or not any(m in os.environ for m in LAUNCHER_MARKERS):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
    return True
