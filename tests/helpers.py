"""Helpers shared by tests (plain functions and constants; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_args(model: Path, data: Path, out: Path, cache: Path, **extra) -> list[str]:
    """Dotted overrides for a short tiny-model run; `extra` uses __ for dots (train__steps=5)."""
    values = {
        "model.path": model, "data.path": data, "data.trigger": "zxq", "output.dir": out, "cache.dir": cache,
        "train.steps": 6, "train.batch_size": 2, "train.resolution": 64, "train.seed": 7, "train.log_every": 1,
        "lora.rank": 4, "lora.alpha": 8, "optim.lr": 1e-3,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]
