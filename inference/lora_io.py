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


def save_lora(target: str | Path, transformer, family: Family, info: dict[str, Any]) -> Path:
    """Save the transformer's active peft LoRA to `target` (a .safetensors path), atomically."""
    from diffusers.training_utils import _collate_lora_metadata
    from peft.utils import get_peft_model_state_dict

    target = Path(target)
    layers = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        family.pipeline_class.save_lora_weights(
            tmp, transformer_lora_layers=layers, **_collate_lora_metadata({"transformer": transformer})
        )
        written = Path(tmp) / WEIGHT_NAME
        with safe_open(written, "pt") as fh:
            header = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    header.update({META_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()})
    with atomic_path(target) as tmp_file:
        save_file(tensors, str(tmp_file), metadata=header)
    return target


def read_header(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a LoRA file (refusing anything that is not safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA '{path}' does not exist")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"LoRA '{path}' is not a .safetensors file; only safetensors are loaded (pickles can run code)")
    try:
        with safe_open(path, "pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"LoRA '{path}' is not a valid safetensors file ({str(exc)[:120]})") from None


def our_info(header: dict[str, str]) -> dict[str, Any]:
    info = {}
    for key, value in header.items():
        if key.startswith(META_PREFIX):
            try:
                info[key[len(META_PREFIX):]] = json.loads(value)
            except ValueError:
                info[key[len(META_PREFIX):]] = value
    return info


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    read_header(path)
    return load_file(str(path))
