"""`flux2-lora export`: one of our LoRA files in the layout another tool reads (inference/lora_formats.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.atomic import atomic_path
from common.errors import UserError
from inference.lora_formats import Format, to_bfl, write_layout
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


def our_pairs(path: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict, dict[str, str], dict]:
    """{module: (A, B with alpha/r applied)}, our header info, the raw header and the peft config (unprefixed),
    from one of our LoRA files."""
    header = read_header(path)
    info = our_info(header)
    state = load_state(path)
    if not any(k.startswith("transformer.") for k in state):
        raise UserError(f"LoRA '{path}' holds no FLUX.2 transformer LoRA weights (keys like "
                        f"{next(iter(state), 'none')!r}); export reads files written by flux2-lora or diffusers")
    kind = info.get("type", "lora")
    if kind != "lora":
        raise UserError(f"LoRA '{path}' is a {kind} adapter; export to other layouts handles plain LoRA only so far "
                        "(its diffusers file loads in flux2-lora; dora also in stock diffusers)")
    config = {k.removeprefix("transformer."): v for k, v in json.loads(header.get("lora_adapter_metadata", "{}")).items()}
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError(f"LoRA '{path}' has per-module ranks or alphas; export handles uniform ones only")
    scale = alpha_scale(config)
    pairs = {}
    for key, a in state.items():
        if key.endswith(_PAIR):
            module = key[len("transformer."): -len(_PAIR)]
            pairs[module] = (a, state[f"transformer.{module}.lora_B.weight"] * scale)
    return pairs, info, header, config


def export_lora(source: str | Path, fmt: Format, out: str | Path) -> dict[str, int]:
    """Write `source` (a LoRA file or run folder) as `fmt` to `out`; returns counts for the summary line."""
    path, out = lora_file(source), Path(out)
    if out.resolve() == path.resolve() or (Path(source).is_dir() and Path(source).resolve() in out.resolve().parents):
        raise UserError(f"--out '{out}' would overwrite or sit inside the input '{source}'; choose another path")
    if out.suffix != ".safetensors":
        raise UserError(f"--out '{out}' must end in .safetensors")
    pairs, info, header, config = our_pairs(path)
    meta = {"format": "pt", **{k: v for k, v in header.items() if k.startswith(META_PREFIX)},
            META_PREFIX + "layout": fmt}
    if fmt == "diffusers":  # alpha baked into lora_B, metadata alpha = rank: every loader gives the same weights
        tensors = {}
        for module, (a, b) in pairs.items():
            tensors[f"transformer.{module}.lora_A.weight"] = a.contiguous()
            tensors[f"transformer.{module}.lora_B.weight"] = b.contiguous()
        baked = baked_config(config) if config.get("r") else config
        meta["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in baked.items()})
        bfl_modules = len(pairs)
    else:
        bfl = to_bfl(pairs)
        tensors, bfl_modules = write_layout(bfl, fmt), len(bfl)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return {"modules": len(pairs), "written_modules": bfl_modules, "tensors": len(tensors),
            "family": info.get("family", "unknown")}
