"""The phases of a training run, named once: the memory planner plans each (trainer/memory.py), the recipe runs
them under `phases.phase(name)`, and `flux2-lora rehearse` measures each against its plan (trainer/rehearse.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

TEXT_ENCODER = "encode captions (text encoder)"
VAE = "encode images (VAE)"
LOAD = "load transformer"
STEP = "train step"
SAMPLES = "render samples"
SAVE = "save and export"


class Phases:
    """What a run tells about its phases: nothing by default; a watcher overrides `phase`."""

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


QUIET = Phases()
