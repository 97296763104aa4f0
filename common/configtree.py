"""One typed config tree: defaults (dataclasses) <- YAML <- dotted CLI overrides, validated once.

Every section is a dataclass that lives next to the code that uses it. This module only knows how to
turn plain dicts into those dataclasses, strictly: an unknown key, a wrong type or a value that fails its
check is a `UserError` naming the full key path, the problem and, for typos, the closest valid key.

The same dataclasses serve command-line options (`add_flags` / `from_args`) and Python keyword arguments
(`from_kwargs`), so a CLI flag, a YAML key and an API argument are checked by one rule. The one `validate`
contract: a dataclass may define `validate(self) -> list[str]`, the problems that involve several fields; all of
them are reported at once, after every field passed its own check.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from common.errors import UserError, refuse

T = TypeVar("T")
Check = Callable[[Any], "str | None"]


def option(
    default: Any = dataclasses.MISSING,
    *,
    check: Check | None = None,
    help: str = "",
    factory=None,
    shown_default: str | None = None,
    migrations: dict[Any, str] | None = None,
) -> Any:
    """A config field with an optional `check(value) -> error text or None`, a help string, (for defaults
    computed per machine) the text the reference docs show instead of the value, and `migrations`: retired
    values and what to write instead."""
    meta = {
        "check": check,
        "help": help,
        "shown_default": shown_default,
        "migrations": migrations or {},
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# Reusable checks -----------------------------------------------------------------------------------------
def positive(v: float) -> str | None:
    if v is not None and not math.isfinite(v):
        return f"must be a finite number, got {v}"
    return None if v is None or v > 0 else f"must be > 0, got {v}"


def non_negative(v: float) -> str | None:
    if v is not None and not math.isfinite(v):
        return f"must be a finite number, got {v}"
    return None if v is None or v >= 0 else f"must be >= 0, got {v}"


def probability(v: float) -> str | None:
    return None if 0 <= v <= 1 else f"must be between 0 and 1, got {v}"


def at_least(n: float) -> Check:
    def check(v: float) -> str | None:
        return None if v is None or v >= n else f"must be >= {n}, got {v}"

    return check


# Building dataclasses from dicts ---------------------------------------------------------------------------
def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def config_key(path: str) -> str:
    return f"config key '{path}'"


def _coerce(value: Any, tp: Any, key: str, name: Callable[[str], str]) -> Any:
    """`value` as type `tp`; `name(key)` is how messages call the key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{name(key)} must be a mapping of keys, got {value!r}")
        return _build(tp, value, key, name)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, name)
            except UserError:
                continue
        raise UserError(f"{name(key)} must be {type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        tip = f"; did you mean {hint[0]!r}?" if hint else ""
        raise UserError(
            f"{name(key)} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}{tip}"
        )
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name(key)} must be {type_name(tp)}, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        items = [_coerce(v, item_tp, f"{key}[{i}]", name) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .nan / .inf: no setting means either
                raise UserError(f"{name(key)} must be a finite number, got {value}")
            return float(value)
        if isinstance(value, str) and _looks_like_float(value):
            return float(value)  # YAML 1.1 reads "5e-5" (no dot) as a string
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(f"{name(key)} must be {type_name(tp)}, got {value!r}")


def from_dict(
    cls: type[T], data: dict[str, Any], prefix: str = "", name: Callable[[str], str] = config_key
) -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and running each field's check, then the
    dataclass's own `validate()`. `name(path)` is how messages call a key (config key, --flag, argument)."""
    return _build(cls, data, prefix, name)


def _build(cls: type[T], data: dict[str, Any], prefix: str, name: Callable[[str], str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            if close:
                tip = f"did you mean {name(prefix + '.' + close[0] if prefix else close[0]).rsplit(' ', 1)[-1]}?"
            else:
                tip = f"valid keys here: {', '.join(fields)}"
            raise UserError(f"{name(full)} is unknown; {tip}")
    kwargs = {}
    for field_name, f in fields.items():
        key = f"{prefix}.{field_name}" if prefix else field_name
        if field_name in data:
            retired = f.metadata.get("migrations", {})
            if (
                isinstance(data[field_name], (str, int, float, bool))
                and data[field_name] in retired
            ):
                raise UserError(f"{name(key)}: {retired[data[field_name]]}")
            value = _coerce(data[field_name], hints[field_name], key, name)
        elif dataclasses.is_dataclass(hints[field_name]):
            value = _build(hints[field_name], {}, key, name)  # absent sections are still validated
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise UserError(
                f"{name(key)} is required but missing; set it in the YAML or as {key}=VALUE"
            )
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise UserError(f"{name(key)} {problem}")
        kwargs[field_name] = value
    obj = cls(**kwargs)
    refuse(validate(obj))
    return obj


def validate(obj: Any) -> list[str]:
    """The dataclass's own cross-field problems (empty when it has no `validate`)."""
    check = getattr(obj, "validate", None)
    return list(check() or []) if callable(check) else []


def from_kwargs(cls: type[T], what: str, **kwargs: Any) -> T:
    """Python API arguments, checked exactly as the config tree checks YAML keys."""
    return from_dict(cls, kwargs, name=lambda key: f"{what} argument '{key}'")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# YAML and dotted overrides ---------------------------------------------------------------------------------
def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"config file '{path}' does not exist; pass an existing YAML file (see configs/)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"config file '{path}' is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(
            f"config file '{path}' is not valid YAML{where}: {getattr(exc, 'problem', exc)}"
        ) from None
    _refuse_cut_hex_codes(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of keys at the top level")
    return data


_CUT_HEX = re.compile(r"^[^#'\"]*\S\s+(#[0-9A-Fa-f]{6}\b|#[0-9A-Fa-f]{3}\b)")


def _refuse_cut_hex_codes(path: Path) -> None:
    """In YAML, " #" starts a comment: an unquoted prompt with a hex colour loses everything from the colour on,
    silently. FLUX.2 prompts use hex colours a lot, so this is checked on the raw text."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = _CUT_HEX.match(line)
        if match and not line.lstrip().startswith("#"):
            raise UserError(
                f"config file '{path}' line {number}: {match.group(1)} starts a YAML comment there, so "
                "the rest of the line is dropped; put the value in quotes"
            )


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML scalars) onto a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key.path=value (e.g. optim.lr=5e-5)")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override '{item}': '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in {"nan", "inf", "-inf", "infinity"}


# Command-line flags from the same dataclasses ------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--flag` per field of `cls`, with its help and default; values are checked by `from_args`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", "")}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        else:
            kwargs["required"] = True
        if f.metadata.get("shown_default"):
            kwargs["help"] += f" (default: {f.metadata['shown_default']})"
        if tp is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(tp) in (list, tuple):
            kwargs["action"] = "append"
        elif typing.get_origin(tp) is Literal:
            kwargs["choices"] = typing.get_args(tp)
        else:
            # X | None -> X
            scalar = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
            if scalar in (int, float, str):
                kwargs["type"] = scalar
        parser.add_argument(_flag(f.name), **kwargs)


def from_args(cls: type[T], args: Any, **fixed: Any) -> T:
    """The dataclass from parsed flags, checked with the same rules as YAML keys; messages name the flags."""
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in vars(args).items() if k in names}
    data.update(fixed)
    return from_dict(cls, data, name=lambda key: f"option '{_flag(key)}'")
