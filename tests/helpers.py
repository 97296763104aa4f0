"""Helpers shared by tests (plain functions and constants; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# How long a test waits for a subprocess before calling it hung. Only a guard against hangs: no test depends on
# how fast the machine is, and a loaded 2-core machine can be ten times slower than an idle one.
HANG = 1800

# (caption, trigger, the caption trained on)
TRIGGER_CASES = [
    ("a photo of zxq, red mug", "zxq", "a photo of zxq, red mug"),  # punctuation after the trigger
    ("zxqfoo logo", "zxq", "zxq, zxqfoo logo"),  # a word that starts with the trigger is not it
    ("a mug in zxq style", "in zxq style", "a mug in zxq style"),  # multi-word, mid-caption
    ("a mug in  zxq\tstyle", "in zxq style", "a mug in  zxq\tstyle"),  # multi-word, other spacing
    ("zxq logo on a mug", "zxq", "zxq logo on a mug"),  # already present
    ("a red mug", "zxq", "zxq, a red mug"),  # absent
    ("zxq logo, zxq mug", "zxq", "zxq logo, mug"),  # repeated: kept once
    ("(zxq) logo", "zxq", "(zxq) logo"),
]


def train_args(model: Path, data: Path, out: Path, cache: Path, **extra) -> list[str]:
    """Dotted overrides for a short tiny-model run; `extra` uses __ for dots (train__steps=5)."""
    values = {
        "model.path": model,
        "data.path": data,
        "data.trigger": "zxq",
        "output.dir": out,
        "cache.dir": cache,
        "train.steps": 6,
        "train.batch_size": 2,
        "train.resolution": 64,
        "train.seed": 7,
        "train.log_every": 1,
        "lora.rank": 4,
        "lora.alpha": 8,
        "optim.lr": 1e-3,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]
