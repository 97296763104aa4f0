"""The LoRA file format: diffusers' own (what `load_lora_weights` reads), plus our provenance keys.

Written by diffusers' `save_lora_weights` (keys `transformer.<module>.lora_A/B.weight`, the peft adapter
config under `lora_adapter_metadata` so rank/alpha survive), then re-written atomically with extra
`flux2_lora.*` header entries (trigger word, base model, family, ...) that stock loaders ignore.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.atomic import atomic_path
from common.errors import UserError
from inference.families import Family

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
META_PREFIX = "flux2_lora."


def save_lora(
    target: str | Path,
    transformer,
    family: Family,
    info: dict[str, Any],
    bake_alpha: bool = True,
    layers: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save the transformer's active peft LoRA to `target` (a .safetensors path), atomically.

    `bake_alpha`: a LoRA's scale alpha/r goes into lora_B and the metadata says alpha = r. ComfyUI reads alpha only
    from `.alpha` tensors (none here: scale 1) and ignores peft's metadata, so an unbaked file with alpha != r would
    apply there at r/alpha times the intended change; baked, every loader gives the same weights. Checkpoints are
    saved unbaked, so resuming multiplies nothing back and forth. `layers`: the LoRA's state dict when the caller
    already gathered it (a sharded model holds only its shard)."""
    from diffusers.training_utils import _collate_lora_metadata
    from peft.utils import get_peft_model_state_dict

    target = Path(target)
    if layers is None:
        layers = get_peft_model_state_dict(transformer)
    layers = {k: v.detach().to("cpu").contiguous() for k, v in layers.items()}
    metadata = _collate_lora_metadata({"transformer": transformer})
    config = metadata.get("transformer_lora_adapter_metadata") or {}
    scale = alpha_scale(config)
    if (
        bake_alpha
        and scale != 1.0
        and not config.get("alpha_pattern")
        and not config.get("rank_pattern")
    ):
        layers = {k: v * scale if ".lora_B." in k else v for k, v in layers.items()}
        metadata["transformer_lora_adapter_metadata"] = baked_config(config)
        info = {**info, "alpha_baked": scale}
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        family.pipeline_class.save_lora_weights(tmp, transformer_lora_layers=layers, **metadata)
        written = Path(tmp) / WEIGHT_NAME
        with safe_open(written, "pt") as fh:
            header = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    header.update(
        {META_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}
    )
    with atomic_path(target) as tmp_file:
        save_file(tensors, str(tmp_file), metadata=header)
    return target


def alpha_scale(config: dict[str, Any]) -> float:
    """A peft LoRA config's scale alpha/r (1 when either is absent: other adapter types, foreign files)."""
    return (
        config["lora_alpha"] / config["r"] if config.get("r") and config.get("lora_alpha") else 1.0
    )


def baked_config(config: dict[str, Any]) -> dict[str, Any]:
    """The same config once alpha/r is folded into lora_B: alpha = r, so every loader applies scale 1."""
    return {**config, "lora_alpha": config["r"]}


def read_keys(path: str | Path) -> list[str]:
    """The tensor names of a LoRA file, without reading the tensors."""
    read_header(path)  # the same refusals: missing, not safetensors, corrupt
    with safe_open(Path(path), "pt") as fh:
        return list(fh.keys())


def read_header(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a LoRA file (refusing anything that is not safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA '{path}' does not exist")
    if path.suffix.lower() != ".safetensors":
        raise UserError(
            f"LoRA '{path}' is not a .safetensors file; only safetensors are loaded (pickles can run code)"
        )
    try:
        with safe_open(path, "pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(
            f"LoRA '{path}' is not a valid safetensors file ({str(exc)[:120]})"
        ) from None


def our_info(header: dict[str, str]) -> dict[str, Any]:
    info = {}
    for key, value in header.items():
        if key.startswith(META_PREFIX):
            try:
                info[key[len(META_PREFIX) :]] = json.loads(value)
            except ValueError:
                info[key[len(META_PREFIX) :]] = value
    return info


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    read_header(path)
    return load_file(str(path))
