"""Shared fixtures: tiny dev and klein models and the sample dataset, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from data_tools.sample_data import write_sample_data
from inference.families import FAMILIES
from inference.tiny import write_tiny_model


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    """Each FLUX.2 family by name: a test that takes `family` runs once per family (the one list of them is
    inference/families.py's)."""
    return request.param


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        name: write_tiny_model(root / f"tiny-{name}", family, pretrained=False)
        for name, family in FAMILIES.items()
    }


@pytest.fixture(scope="session")
def pretrained_models(tmp_path_factory) -> dict[str, Path]:
    """The shipped tiny models pretrained on the shapes world: the ones a LoRA visibly teaches something."""
    root = tmp_path_factory.mktemp("pretrained")
    return {
        name: write_tiny_model(root / f"tiny-{name}", family) for name, family in FAMILIES.items()
    }


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    return write_sample_data(tmp_path_factory.mktemp("data") / "marks", count=6, trigger="zxq")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")
