"""The optional extras (`pip install 'flux2-lora[NAME]'`): which package each brings, the oldest version the code
and the libraries it drives accept, and the one check that says what to install before any weights load.

The floors are what the libraries themselves refuse below (diffusers' quantizers: bitsandbytes >= 0.43.3,
torchao >= 0.15; transformers 5's bitsandbytes >= 0.46.1 for the text encoder), so an old install gets one line
here instead of their ImportError minutes into a run. pyproject.toml's extras state the same floors (a test
compares them).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata


@dataclasses.dataclass(frozen=True)
class Extra:
    name: str  # the extra: pip install 'flux2-lora[name]'
    package: str  # its distribution on PyPI
    module: str  # what we import
    floor: str  # the oldest version that works


EXTRAS = {
    e.name: e
    for e in (
        Extra("bnb", "bitsandbytes", "bitsandbytes", "0.46.1"),
        Extra("quant", "torchao", "torchao", "0.15.0"),
        Extra("prodigy", "prodigyopt", "prodigyopt", "1.0"),
    )
}


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def extra_problem(name: str, needed_for: str) -> str | None:
    """Why extra `name` cannot serve `needed_for` (e.g. "model.quantize: nf4"), as one line with the install
    command; None when it is installed at a working version and imports."""
    from packaging.version import InvalidVersion, Version

    extra = EXTRAS[name]
    install = f"pip install -U 'flux2-lora[{extra.name}]'"
    version = installed_version(extra.package)
    if version is None:
        return f"{needed_for} needs {extra.package} >= {extra.floor}, which is not installed: {install}"
    try:
        too_old = Version(version) < Version(extra.floor)
    except InvalidVersion:
        too_old = False  # a local build with its own version string: let the import decide
    if too_old:
        return f"{needed_for} needs {extra.package} >= {extra.floor}, but {version} is installed: {install}"
    try:
        importlib.import_module(extra.module)
    # a broken install (missing CUDA libraries, ABI mismatch) fails in many ways
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        return f"{needed_for} needs {extra.package}, installed ({version}) but it does not import ({reason}): {install}"
    return None
