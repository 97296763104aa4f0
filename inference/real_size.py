"""A FLUX.2 of a real size with random weights, in the hub's folder layout, for rehearsals (`flux2-lora rehearse`):
the transformer and text encoder from the configs shipped in inference/architectures, the real VAE, the tiny
model's tokenizer (its ids are far below the real vocabulary, which the embedding keeps, and it has the chat
template the pipeline calls) and scheduler. Written the way the hub holds a model (model_index.json, sharded
safetensors with their index files), so loading it runs the normal `model.path` code.

`layers=(D, S)` keeps the real widths and cuts the transformer to D double + S single blocks and the text encoder
to the same share of its depth (at least 3 layers); the pipeline then reads that many hidden states spread over
the cut encoder (inference/conditioning.py: text_layers).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from common.atomic import atomic_dir
from common.errors import UserError
from inference.families import ARCHITECTURES_DIR, FAMILIES, Family, Variant

SHARD = "5GB"  # the hub's usual shard size: a real checkpoint is read shard by shard


def real_variants() -> dict[str, tuple[Family, Variant]]:
    """Every FLUX.2 size whose architecture ships with the package, by its hub id."""
    return {v.base_model: (f, v) for f in FAMILIES.values() for v in f.variants if v.architecture}


def _random_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Random weights in place, one tensor at a time: N(0, 0.02) for matrices (the usual init, small enough that a
    deep stack stays finite in bf16), ones for norm scales and zeros for biases, so activations keep their scale."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def _cut_transformer(config: dict, layers: tuple[int, int] | None) -> dict:
    if layers:
        config = {**config, "num_layers": layers[0], "num_single_layers": layers[1]}
    return config


def _text_config(config: dict, share: float | None) -> dict:
    """The text encoder's config, its depth cut to `share` (at least 3 layers) when the transformer is cut."""
    if share is None:
        return config
    text = config.get("text_config", config)
    depth = max(3, round(text["num_hidden_layers"] * share))
    if "text_config" in config:
        return {**config, "text_config": {**text, "num_hidden_layers": depth}}
    return {**config, "num_hidden_layers": depth}


def write_real_size_model(
    out: str | Path,
    hub_id: str,
    layers: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Write the random model of the size `hub_id` names to `out` (atomically); returns `out`."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    known = real_variants()
    if hub_id not in known:
        raise UserError(
            f"no shipped architecture for '{hub_id}'; rehearsals know {', '.join(known)}"
        )
    family, variant = known[hub_id]
    folder = ARCHITECTURES_DIR / variant.architecture
    generator = torch.Generator().manual_seed(seed)
    out = Path(out)
    with atomic_dir(out) as tmp:
        # the tiny model's folder gives model_index.json, tokenizer and scheduler as the pipeline saves them;
        # its three models are then replaced by the real sizes
        from inference.tiny import build_tiny_pipeline

        tiny = build_tiny_pipeline(family)
        tiny.save_pretrained(tmp)
        image_token = getattr(tiny.text_encoder.config, "image_token_index", None)
        del tiny
        for component in ("transformer", "text_encoder", "vae"):
            shutil.rmtree(tmp / component)

        full = json.loads((folder / "transformer" / "config.json").read_text())
        t_config = _cut_transformer(full, layers)
        with init_empty_weights():
            transformer = getattr(diffusers, t_config["_class_name"]).from_config(t_config)
        transformer = transformer.to(dtype).to_empty(device="cpu")
        _random_(transformer, generator)
        transformer.save_pretrained(tmp / "transformer", max_shard_size=SHARD)
        del transformer

        share = sum(layers) / (full["num_layers"] + full["num_single_layers"]) if layers else None
        te_config = _text_config(
            json.loads((folder / "text_encoder" / "config.json").read_text()), share
        )
        # the tokenizer's [IMG] id (no prompt holds one; the model must agree)
        if image_token is not None:
            te_config["image_token_index"] = image_token
        model_type = te_config.pop("model_type")
        config = transformers.AutoConfig.for_model(model_type, **te_config)
        with init_empty_weights():
            text_encoder = getattr(transformers, te_config["architectures"][0])(config)
        text_encoder = text_encoder.to(dtype).to_empty(device="cpu")
        _random_(text_encoder, generator)
        text_encoder.tie_weights()
        text_encoder.save_pretrained(tmp / "text_encoder", max_shard_size=SHARD)
        del text_encoder

        # FLUX.2's VAE is the class's default configuration; its own initialisation is random enough
        diffusers.AutoencoderKLFlux2().to(dtype).save_pretrained(tmp / "vae")
    return out
