"""`flux2-lora export`: one of our LoRA files in the layout another tool reads (inference/lora_formats.py).

What each tool can carry (the refusals live with each kind in inference/adapter_kinds.py, which `export`, the
training config's output.export check and the README's table, tests/test_interop.py, share):
- lora: every layout.
- lokr / loha: comfyui in LyCORIS keys (ComfyUI reads them natively); kohya and bfl as the exact plain LoRA of the
  same change (musubi-tuner and ai-toolkit read plain LoRA), at a higher rank (inference/lora_formats.py).
- dora: comfyui and bfl with ComfyUI's `dora_scale`, which scales each output row of W + dW by dora_scale / |W|: a
  function of the base weights, so the export reads them (--model, or the base the LoRA's header names). musubi-
  tuner and kohya apply no magnitudes, so kohya is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.atomic import atomic_path
from common.errors import UserError
from inference.adapter_kinds import factor_names, kind_of
from inference.lora_formats import (
    Format,
    bfl_name,
    dora_scales,
    lycoris_as_lora,
    lycoris_layout,
    to_bfl,
    write_layout,
)
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
_MAGNITUDE = ".lora_magnitude_vector"


def _peft_config(path: Path, header: dict[str, str]) -> dict:
    """The file's peft config (unprefixed); export writes one scale for every module, so per-module ones are refused."""
    config = {
        k.removeprefix("transformer."): v
        for k, v in json.loads(header.get("lora_adapter_metadata", "{}")).items()
    }
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError(
            f"LoRA '{path}' has per-module ranks or alphas; export handles uniform ones only"
        )
    return config


def _modules(path: Path, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{diffusers module: {role: tensor}} of one of our files (roles: lora_A, lora_B, magnitude, LyCORIS factors)."""
    if not any(k.startswith("transformer.") for k in state):
        raise UserError(
            f"LoRA '{path}' holds no FLUX.2 transformer LoRA weights (keys like "
            f"{next(iter(state), 'none')!r}); export reads files written by flux2-lora or diffusers"
        )
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        body = key.removeprefix("transformer.")
        for suffix, role in (
            (_PAIR, "lora_A"),
            (".lora_B.weight", "lora_B"),
            (_MAGNITUDE, "magnitude"),
        ):
            if body.endswith(suffix):
                modules.setdefault(body[: -len(suffix)], {})[role] = tensor
                break
        else:
            module, _, factor = body.rpartition(".")
            if factor in factor_names():
                modules.setdefault(module, {})[factor] = tensor
    return modules


def _pairs(modules: dict, kind, scale: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (down, up)} whose product is the module's change at `scale` (LyCORIS factors made exact pairs)."""
    if kind.lycoris:
        return {
            m: (down, up * scale)
            for m, (up, down) in ((m, lycoris_as_lora(f)) for m, f in modules.items())
        }
    return {m: (f["lora_A"], f["lora_B"] * scale) for m, f in modules.items()}


def _fused_scales(scales: dict[str, torch.Tensor], weight_of: Callable) -> dict[str, torch.Tensor]:
    """Per diffusers module dora_scale -> per BFL module, (out, 1): q/k/v rows concatenated in order (a third the
    LoRA leaves alone keeps its base row norm: factor 1); the adaLN halves swapped as lora_B's are."""
    from inference.lora_formats import SWAPPED, diffusers_names

    grouped: dict[str, list[str]] = {}
    for module in scales:
        grouped.setdefault(bfl_name(module)[0], []).append(module)
    out = {}
    for name in grouped:
        parts = [
            scales[m] if m in scales else weight_of(m).norm(dim=1) for m in diffusers_names(name)
        ]
        scale = torch.cat(parts)
        if name == SWAPPED:
            scale = torch.cat(scale.chunk(2)[::-1])
        out[name] = scale.reshape(-1, 1)
    return out


def export_lora(source: str | Path, fmt: Format, out: str | Path, model: str | None = None) -> dict:
    """Write `source` (a LoRA file or run folder) as `fmt` to `out`; returns counts for the summary line. `model`:
    the base model (folder or hub id) a DoRA export reads its weights from; default, the one the header names."""
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
    kind = kind_of(info.get("type", "lora"))
    weight_of = None
    if kind.needs_base(fmt):
        weight_of = _base_weights(model or info.get("base_model"), path)
    if problem := kind.export_problem(fmt, has_base=weight_of is not None):
        raise UserError(f"LoRA '{path}': {problem}")
    meta = {
        "format": "pt",
        **{k: v for k, v in header.items() if k.startswith(META_PREFIX)},
        META_PREFIX + "layout": fmt,
    }
    state = load_state(path)
    modules = _modules(path, state)
    config = _peft_config(path, header)
    # already the layout diffusers and flux2-lora read (a plain LoRA is rewritten with its alpha baked in)
    if fmt == "diffusers" and (kind.lycoris or kind.magnitudes):
        tensors = state
        meta["lora_adapter_metadata"] = header.get("lora_adapter_metadata", "{}")
        written = len(modules)
    elif fmt == "comfyui" and kind.lycoris:  # ComfyUI reads LyCORIS factors natively
        scale = config["alpha"] / config["r"] if config.get("r") and config.get("alpha") else 1.0
        tensors, written = lycoris_layout(modules, kind.name, scale), len(modules)
    else:
        scale = (
            config["alpha"] / config["r"]
            if kind.lycoris and config.get("r")
            else alpha_scale(config)
        )
        pairs = _pairs(modules, kind, scale)
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
            scales = None
            if kind.magnitudes:
                deltas = {m: b.float() @ a.float() for m, (a, b) in pairs.items()}
                magnitudes = {m: f["magnitude"] for m, f in modules.items()}
                scales = _fused_scales(dora_scales(magnitudes, deltas, weight_of), weight_of)
            tensors, written = write_layout(bfl, fmt, scales), len(bfl)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return {
        "modules": len(modules),
        "written_modules": written,
        "tensors": len(tensors),
        "family": info.get("family", "unknown"),
        "kind": kind.name,
        "max_rank": max(
            (
                t.shape[0]
                for k, t in tensors.items()
                if k.endswith(("lora_A.weight", "lora_down.weight"))
            ),
            default=0,
        ),
    }


def _base_weights(model: str | None, path: Path):
    """The base weights of `model`, or None when there is none to read (the caller says what to pass)."""
    if not model:
        return None
    from inference.loading import ModelConfig, resolve_base_model, transformer_weights

    try:
        return transformer_weights(resolve_base_model(ModelConfig(path=model)))
    except UserError as exc:
        raise UserError(f"LoRA '{path}': a dora export reads the base weights, and {exc}") from None
