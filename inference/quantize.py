"""Weight-only quantisation of the frozen transformer and text encoder, through diffusers' and transformers'
own quantisation configs (torchao float8 / int8 with scales, bitsandbytes nf4). The LoRA trains in full
precision on top (peft wraps the quantised Linear layers).

One home for what quantisation means here: which Linear layers are converted, how many bytes a weight then
takes (the memory planner reads the same table) and what a machine needs for each kind.
"""

from __future__ import annotations

import importlib
from typing import Literal

import torch

from common.extras import extra_problem

Quantize = Literal["none", "fp8", "int8", "nf4"]
QUANTIZE_HELP = (
    "none; fp8 / int8 (torchao weight-only with per-row scales, any device); nf4 (bitsandbytes 4-bit, "
    "CUDA only). Applied while loading: the full-precision model is never whole in RAM"
)

# Small layers at the model's edges stay in full precision, as every trainer keeps them: they carry the
# input/output scale and quantising them costs quality for a few MB. Everything else that is a Linear is converted.
# Matched as the loaders match modules_to_not_convert: a name, or a dotted part of one (FLUX.2 has each once).
TRANSFORMER_KEEP_FULL = (
    "x_embedder",
    "context_embedder",
    "proj_out",
    "norm_out",
    "time_guidance_embed",
)
TEXT_ENCODER_KEEP_FULL = ("lm_head",)  # never run: encoding reads hidden states

# Bytes per weight of a converted Linear, and the per-output-row scale bytes (torchao keeps one bf16 scale a row;
# nf4 keeps an 8-bit absmax a 64-weight block, double-quantised with one fp32 a 256 blocks).
WEIGHT_BYTES = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
ROW_SCALE_BYTES = {"fp8": 2, "int8": 2, "nf4": 0}
# torchao's transients per bf16 byte of one Linear's weight, measured on the CPU with the profiler's allocation
# events ([55296, 6144] and [9216, 3072] alike; flux2-lora rehearse found them): converting it while the model loads
# (float32 copies for the row scales), and dequantising it in a forward (float8's CPU kernels hold five copies; a
# GPU's are leaner, so the plan errs high there). nf4 (bitsandbytes, CUDA) is not measured here.
CONVERT_TEMPORARY = {"int8": 4.0, "fp8": 7.5}
FORWARD_DEQUANTISED = {"int8": 1.0, "fp8": 5.0}


def largest_converted(model: torch.nn.Module, keep_full: tuple[str, ...]) -> int:
    """Weights of the largest Linear that quantisation converts (its transients are the largest)."""
    return max(
        (
            m.weight.numel()
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and converted(name, keep_full)
        ),
        default=0,
    )


def converted(name: str, keep_full: tuple[str, ...]) -> bool:
    """Whether the Linear called `name` is quantised (the same rule the loaders are given)."""
    return not any(f".{k}." in f".{name}." for k in keep_full)


def quantized_bytes(
    model: torch.nn.Module, kind: Quantize, dtype_bytes: int, keep_full: tuple[str, ...]
) -> int:
    """Bytes of `model`'s weights (meta or real) after quantisation `kind`: the loaders' rule, counted."""
    total, linear_ids = 0, set()
    if kind != "none":
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and converted(name, keep_full):
                weight = module.weight
                linear_ids.add(id(weight))
                total += (
                    int(weight.numel() * WEIGHT_BYTES[kind])
                    + weight.shape[0] * ROW_SCALE_BYTES[kind]
                )
    seen = set(linear_ids)
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * dtype_bytes
    return total


def quantize_problem(kind: Quantize, key: str, device_type: str) -> str | None:
    """What stops quantisation `kind` on this machine, as one line naming config key `key`; None when it can run."""
    if kind == "none":
        return None
    if kind == "nf4":
        if device_type != "cuda":
            return (
                f"{key}: nf4 (bitsandbytes) runs on a CUDA GPU only; on this machine use {key}: int8 or fp8 "
                "(torchao), or none"
            )
        return extra_problem("bnb", f"{key}: nf4")
    return extra_problem("quant", f"{key}: {kind}")


def torchao_type(kind: Quantize):
    """torchao's weight-only config for int8 or fp8 (the loaders and the memory probe quantise with it)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()


def diffusers_config(kind: Quantize, compute_dtype: torch.dtype):
    """The diffusers quantisation config that loads the transformer quantised (None for none)."""
    return _config("diffusers", kind, compute_dtype, TRANSFORMER_KEEP_FULL)


def transformers_config(kind: Quantize, compute_dtype: torch.dtype):
    """The transformers quantisation config that loads the text encoder quantised (None for none)."""
    return _config("transformers", kind, compute_dtype, TEXT_ENCODER_KEEP_FULL)


def _config(library: str, kind: Quantize, compute_dtype: torch.dtype, keep_full: tuple[str, ...]):
    # both libraries name their configs alike and take the same arguments
    if kind == "none":
        return None
    module = importlib.import_module(library)
    if kind == "nf4":
        return module.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=list(keep_full),
        )
    return module.TorchAoConfig(torchao_type(kind), modules_to_not_convert=list(keep_full))
