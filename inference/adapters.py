"""Loading LoRA adapters onto a base pipeline: our format and other tools' (via diffusers' converters),
checked against the base model before anything is injected."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from common.errors import UserError
from inference.adapter_kinds import factor_names, kind_of
from inference.lora_formats import dora_magnitudes, from_foreign, is_foreign
from inference.lora_io import load_state, our_info, read_header, read_keys

_MODULE = re.compile(
    rf"^transformer\.(.+?)\.({'|'.join(sorted(factor_names(), key=len, reverse=True))})(\.[\w.]+)?(\.weight)?$"
)


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    sha256: str
    # our flux2_lora.* header entries (trigger, family, rank, ...), empty for other tools' files
    info: dict[str, Any]

    @property
    def trigger(self) -> str:
        return str(self.info.get("trigger") or "")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_fits(state: dict, transformer, path: Path) -> None:
    """Every tensor finite, every targeted module present, and each lora_A / lora_B pair the layer's shape with one
    rank between them: checked here, so nothing reaches the loader that it would refuse with a traceback (or load
    as NaN pixels)."""
    import torch

    modules = dict(transformer.named_modules())
    ranks: dict[str, dict[str, int]] = {}
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(
                f"LoRA '{path}': tensor {key} holds NaN or infinite values; the file is damaged "
                "(or its training diverged): use an earlier checkpoint"
            )
        match = _MODULE.match(key)
        if not match:
            continue
        module = modules.get(match.group(1))
        if module is None:
            raise UserError(
                f"LoRA '{path}' targets '{match.group(1)}', which this base model does not have; "
                "it was made for another FLUX.2 family or size"
            )
        base = getattr(module, "base_layer", module)
        expected = getattr(base, "in_features", None), getattr(base, "out_features", None)
        if (match.group(2) == "lora_A" and tensor.shape[1] != expected[0]) or (
            match.group(2) == "lora_B" and tensor.shape[0] != expected[1]
        ):
            raise UserError(
                f"LoRA '{path}' does not fit this base model ({match.group(1)}: LoRA shape "
                f"{tuple(tensor.shape)}, layer {expected[0]}->{expected[1]}); it was made for another "
                "FLUX.2 family or size"
            )
        if match.group(2) in ("lora_A", "lora_B") and tensor.dim() == 2:
            ranks.setdefault(match.group(1), {})[match.group(2)] = tensor.shape[
                0 if match.group(2) == "lora_A" else 1
            ]
    for module, pair in ranks.items():
        if len(set(pair.values())) > 1:
            raise UserError(
                f"LoRA '{path}' is damaged: {module} has lora_A of rank {pair['lora_A']} and lora_B of "
                f"rank {pair['lora_B']} (they must match); re-export or re-train it"
            )


def load_adapter(
    pipe, family_name: str, path: str | Path, name: str, allow_partial: bool = False
) -> AdapterInfo:
    """Validate `path` against the loaded base, then inject it as adapter `name`. Files in the BFL/ComfyUI/ai-toolkit
    or kohya/musubi layouts are converted exactly first (inference/lora_formats.py); a file some of whose modules
    would not be applied is refused unless `allow_partial`."""
    path = Path(path)
    header = read_header(path)  # refuses missing files, pickles and corrupt headers
    info = our_info(header)
    if info.get("family") and info["family"] != family_name:
        raise UserError(
            f"LoRA '{path}' was trained on FLUX.2 {info['family']}, but the base model is {family_name}; "
            f"use a {info['family']} base or a LoRA trained on {family_name}"
        )
    keys = read_keys(path)
    source: str | dict = str(path.parent)
    foreign = is_foreign(keys, header)
    # only then are the tensors read here; our own files go straight to diffusers' loader
    if foreign:
        converted = from_foreign(load_state(path))
        if converted.unplaced and not allow_partial:
            raise UserError(
                f"LoRA '{path}': {len(converted.unplaced)} of its modules have no place in FLUX.2 and would be "
                f"dropped (e.g. {', '.join(converted.unplaced[:3])}); pass --allow-partial to load the rest"
            )
        state = converted.state
        if converted.dora_scales:  # ComfyUI's DoRA: peft's magnitudes need the base weights
            _check_fits(state, pipe.transformer, path)
            weights = _base_weights(pipe.transformer)
            for module, m in dora_magnitudes(converted, weights.__getitem__).items():
                state[f"transformer.{module}.lora_magnitude_vector"] = m
        source = state
    else:
        try:
            state = pipe.lora_state_dict(
                str(path.parent), weight_name=path.name, use_safetensors=True
            )
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise UserError(
                f"LoRA '{path}' is not a FLUX.2 LoRA diffusers can read "
                f"({str(exc).splitlines()[0][:150]})"
            ) from None
    if not any(k.startswith("transformer.") for k in state):
        raise UserError(
            f"LoRA '{path}' has no FLUX.2 transformer weights (keys like {next(iter(keys), 'none')!r}); "
            "it was made for another model"
        )
    _check_fits(state, pipe.transformer, path)
    kind = kind_of(info.get("type", "lora"))
    if not foreign and not kind.stock_diffusers:
        _inject_with_peft(pipe.transformer, state, header, kind.peft_class, name, path)
    elif isinstance(source, dict):
        pipe.load_lora_weights(source, adapter_name=name)
    else:
        # loading from the file (not the dict above) keeps the adapter metadata, so alpha != rank loads at its scale
        pipe.load_lora_weights(
            source, weight_name=path.name, adapter_name=name, use_safetensors=True
        )
    _refuse_dropped(pipe, state, name, path, allow_partial)
    return AdapterInfo(name=name, path=path, sha256=sha256_file(path), info=info)


def _base_weights(transformer) -> dict:
    """module name -> its frozen base weight (under a peft wrapper, the wrapped layer's)."""
    import torch

    return {
        n: getattr(m, "base_layer", m).weight
        for n, m in transformer.named_modules()
        if isinstance(getattr(m, "base_layer", m), torch.nn.Linear)
    }


def _refuse_dropped(pipe, state: dict, name: str, path: Path, allow_partial: bool) -> None:
    """Loaders log a warning and move on when keys match no module: count what was injected against the file."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wanted = {m.group(1) for k in state if (m := _MODULE.match(k))}
    injected = {
        n
        for n, m in pipe.transformer.named_modules()
        if isinstance(m, BaseTunerLayer)
        and any(name in getattr(m, attr, {}) for attr in m.adapter_layer_names)
    }
    missing = sorted(wanted - injected)
    if missing and not allow_partial:
        pipe.delete_adapters(name)
        raise UserError(
            f"LoRA '{path}': {len(missing)} of its {len(wanted)} modules were not applied "
            f"(e.g. {', '.join(missing[:3])}); pass --allow-partial to use it anyway"
        )


def _inject_with_peft(
    transformer, state: dict, header: dict, config_class: str, name: str, path: Path
) -> None:
    """Adapter types diffusers' loader refuses (LoHa): the peft config saved in the header, injected by peft."""
    import peft

    cls = getattr(peft, config_class)
    saved = {
        k.removeprefix("transformer."): v
        for k, v in json.loads(header.get("lora_adapter_metadata", "{}")).items()
    }
    fields = {f.name for f in dataclasses.fields(cls)}
    try:
        config = cls(
            **{
                k: v
                for k, v in saved.items()
                if k in fields and k not in ("peft_type", "task_type")
            }
        )
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"LoRA '{path}' has an unreadable {config_class} in its header ({exc})"
        ) from None
    transformer.add_adapter(config, adapter_name=name)
    result = peft.set_peft_model_state_dict(
        transformer,
        {k.removeprefix("transformer."): v for k, v in state.items()},
        adapter_name=name,
    )
    if result.unexpected_keys:
        raise UserError(
            f"LoRA '{path}' holds weights this base model has no place for "
            f"(e.g. {result.unexpected_keys[0]}); it was made for another FLUX.2 family or size"
        )
