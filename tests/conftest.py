"""Shared fixtures: tiny dev and klein models and the sample dataset, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from inference.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {family: write_tiny_model(root / f"tiny-{family}", family) for family in ("klein", "dev")}


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    from data_tools.sample_data import write_sample_data

    return write_sample_data(tmp_path_factory.mktemp("data") / "marks", count=6, trigger="zxq")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def train_args(model: Path, data: Path, out: Path, cache: Path, **extra) -> list[str]:
    """Dotted overrides for a short tiny-model run; `extra` uses __ for dots (train__steps=5)."""
    values = {
        "model.path": model, "data.path": data, "data.trigger": "zxq", "output.dir": out, "cache.dir": cache,
        "train.steps": 6, "train.batch_size": 2, "train.resolution": 64, "train.seed": 7, "train.log_every": 1,
        "lora.rank": 4, "lora.alpha": 8, "optim.lr": 1e-3,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]
