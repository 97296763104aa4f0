"""What this machine has, read once where a rule needs it (the memory planner, generate's dtype choice)."""

from __future__ import annotations

import os

GIB = 1024**3


def detected_ram() -> float:
    """GiB of this machine's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
