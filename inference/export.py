"""`flux2-lora export`: one of our LoRA files in the layout another tool reads (inference/lora_formats.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.atomic import atomic_path
from common.errors import UserError
from inference.lora_formats import LYCORIS, Format, lycoris_layout, to_bfl, write_layout
from inference.lora_io import (
    META_PREFIX,
    alpha_scale,
    baked_config,
    load_state,
    our_info,
    read_header,
)
from inference.runs import lora_file

_PAIR = ".lora_A.weight"


def our_pairs(
    path: Path, header: dict[str, str]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """{module: (A, B with alpha/r applied)} and the peft config (unprefixed), from one of our plain-LoRA files."""
    state = load_state(path)
    if not any(k.startswith("transformer.") for k in state):
        raise UserError(
            f"LoRA '{path}' holds no FLUX.2 transformer LoRA weights (keys like "
            f"{next(iter(state), 'none')!r}); export reads files written by flux2-lora or diffusers"
        )
    config = _uniform_config(path, header)
    scale = alpha_scale(config)
    pairs = {}
    for key, a in state.items():
        if key.endswith(_PAIR):
            module = key[len("transformer.") : -len(_PAIR)]
            pairs[module] = (a, state[f"transformer.{module}.lora_B.weight"] * scale)
    return pairs, config


def _uniform_config(path: Path, header: dict[str, str]) -> dict:
    """The file's peft config (unprefixed); export writes one scale for every module, so per-module ones are refused."""
    config = _peft_config(header)
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError(
            f"LoRA '{path}' has per-module ranks or alphas; export handles uniform ones only"
        )
    return config


def _peft_config(header: dict[str, str]) -> dict:
    return {
        k.removeprefix("transformer."): v
        for k, v in json.loads(header.get("lora_adapter_metadata", "{}")).items()
    }


def export_problem(kind: str, fmt: str) -> str | None:
    """Why an adapter of `kind` (lora, dora, lokr, loha) cannot be written as `fmt`, or None. The one rule, used by
    `export` and by the training config's output.export check."""
    if kind == "dora" and fmt != "diffusers":
        return (
            "a dora adapter cannot be exported as "
            + fmt
            + ": ComfyUI normalises DoRA by the base weight's norm "
            "and peft by the merged weight's, so no file without the base weights applies it exactly there; use "
            "its diffusers file (stock diffusers and flux2-lora load it)"
        )
    if kind in LYCORIS and fmt not in ("comfyui", "diffusers"):
        reader = "musubi-tuner / kohya" if fmt == "kohya" else "ai-toolkit"
        return (
            f"a {kind} adapter cannot be exported as {fmt}: {reader} reads plain LoRA only; export it as comfyui "
            "(LyCORIS keys) or diffusers, or train lora.type: lora"
        )
    return None


def _lycoris_tensors(
    path: Path, header: dict[str, str], kind: str
) -> tuple[dict[str, torch.Tensor], int]:
    state = load_state(path)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, factor = key.removeprefix("transformer.").rpartition(".")
        if factor in LYCORIS[kind]:
            modules.setdefault(module, {})[factor] = tensor
    config = _uniform_config(path, header)
    scale = config["alpha"] / config["r"] if config.get("r") and config.get("alpha") else 1.0
    return lycoris_layout(modules, kind, scale), len(modules)


def export_lora(source: str | Path, fmt: Format, out: str | Path) -> dict[str, int]:
    """Write `source` (a LoRA file or run folder) as `fmt` to `out`; returns counts for the summary line."""
    path, out = lora_file(source), Path(out)
    if out.resolve() == path.resolve() or (
        Path(source).is_dir() and Path(source).resolve() in out.resolve().parents
    ):
        raise UserError(
            f"--out '{out}' would overwrite or sit inside the input '{source}'; choose another path"
        )
    if out.suffix != ".safetensors":
        raise UserError(f"--out '{out}' must end in .safetensors")
    header = read_header(path)
    info = our_info(header)
    kind = info.get("type", "lora")
    if problem := export_problem(kind, fmt):
        raise UserError(f"LoRA '{path}': {problem}")
    meta = {
        "format": "pt",
        **{k: v for k, v in header.items() if k.startswith(META_PREFIX)},
        META_PREFIX + "layout": fmt,
    }
    if fmt == "diffusers" and kind != "lora":  # already the layout diffusers and flux2-lora read
        tensors = load_state(path)
        meta["lora_adapter_metadata"] = header.get("lora_adapter_metadata", "{}")
        modules = written = len({k.rpartition(".")[0] for k in tensors})
    elif kind in LYCORIS:
        tensors, modules = _lycoris_tensors(path, header, kind)
        written = modules
    else:
        pairs, config = our_pairs(path, header)
        modules = len(pairs)
        # alpha baked into lora_B, metadata alpha = rank: every loader gives the same weights
        if fmt == "diffusers":
            tensors = {}
            for module, (a, b) in pairs.items():
                tensors[f"transformer.{module}.lora_A.weight"] = a.contiguous()
                tensors[f"transformer.{module}.lora_B.weight"] = b.contiguous()
            baked = baked_config(config) if config.get("r") else config
            meta["lora_adapter_metadata"] = json.dumps(
                {f"transformer.{k}": v for k, v in baked.items()}
            )
            written = len(pairs)
        else:
            bfl = to_bfl(pairs)
            tensors, written = write_layout(bfl, fmt), len(bfl)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return {
        "modules": modules,
        "written_modules": written,
        "tensors": len(tensors),
        "family": info.get("family", "unknown"),
    }
