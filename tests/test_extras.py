"""The optional extras: an old, missing or broken install is one line naming the pip command, before any weights
load; the floors in pyproject.toml are the ones the code checks."""

import importlib
import importlib.metadata

import pytest
import tomllib

from common.extras import EXTRAS, extra_problem
from flux2_lora import main
from helpers import REPO, train_args


def _fake_version(monkeypatch, package: str, version: str | None):
    real = importlib.metadata.version

    def fake(name):
        if name != package:
            return real(name)
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(importlib.metadata, "version", fake)


def test_pyproject_extras_state_the_floors_the_code_checks():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra in EXTRAS.values():
        wanted = f"{extra.package}>={extra.floor}"
        assert wanted in extras[extra.name], (extra.name, extras[extra.name])
        # the test extra carries every extra that runs on a CPU, at the same floor
        if extra.name != "bnb":
            assert wanted in extras["test"], extras["test"]


def test_an_old_torchao_is_refused_before_loading(
    monkeypatch, tiny_models, sample_data, tmp_path, capsys
):
    # diffusers' quantizer raises ImportError below 0.15
    _fake_version(monkeypatch, "torchao", "0.14.1")
    (tmp_path / "c.yaml").write_text("{}\n")
    args = train_args(
        tiny_models["klein"],
        sample_data,
        tmp_path / "out",
        tmp_path / "cache",
        model__quantize="int8",
    )
    assert main(["train", "--config", str(tmp_path / "c.yaml"), *args]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: model.quantize: int8 needs torchao >= 0.15.0, but 0.14.1 is installed: "
        "pip install -U 'flux2-lora[quant]'"
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_broken_install_is_named(monkeypatch):
    real = importlib.import_module

    def broken(name, *a):
        if name == "torchao":
            raise OSError("libcudart.so.12: cannot open shared object file")
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", broken)
    problem = extra_problem("quant", "model.text_encoder_quantize: fp8")
    assert problem.startswith("model.text_encoder_quantize: fp8 needs torchao, installed (")
    assert "does not import (libcudart.so.12: cannot open shared object file)" in problem


@pytest.mark.parametrize("version", [None, "0.43.0"])
def test_bitsandbytes_floor_is_checked_for_the_optimizer(monkeypatch, version):
    _fake_version(monkeypatch, "bitsandbytes", version)
    problem = extra_problem("bnb", "optim.name: adamw8bit")
    assert problem.startswith("optim.name: adamw8bit needs bitsandbytes >= 0.46.1")
    assert problem.endswith("pip install -U 'flux2-lora[bnb]'")
