"""LoRA on the FLUX.2 transformer through peft, with target presets named after FLUX.2's real modules."""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import torch

from common.configtree import option, positive, probability
from inference.adapter_kinds import KINDS

_DOUBLE_ATTN = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_DOUBLE_MLP = r"transformer_blocks\.\d+\.(ff|ff_context)\.(linear_in|linear_out)"
# Single-stream blocks fuse attention and MLP into to_qkv_mlp_proj / to_out, so they belong to every preset.
# (A bare "to_out" would also match the double block's ModuleList and fail, hence full-name regexes.)
_SINGLE = r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"

PRESETS = {
    "attention": f"({_DOUBLE_ATTN}|{_SINGLE})",
    "attention_mlp": f"({_DOUBLE_ATTN}|{_DOUBLE_MLP}|{_SINGLE})",
}


@dataclasses.dataclass
class LoraSettings:
    # the registered adapter kinds (inference/adapter_kinds.py)
    type: Literal[tuple(KINDS)] = option(
        "lora",
        help="; ".join(kind.help for kind in KINDS.values()) + ". All export to ComfyUI",
    )
    rank: int = option(16, check=positive, help="LoRA rank r")
    alpha: float = option(16.0, check=positive, help="scale = alpha / rank")
    dropout: float = option(0.0, check=probability, help="dropout on the LoRA branch")
    targets: Literal["attention", "attention_mlp", "all_linear"] = option(
        "attention_mlp", help="all_linear adds every other Linear: modulation, embedders, proj_out"
    )
    init_seed: int | None = option(None, help="seed for LoRA init; defaults to train.seed")

    @property
    def kind(self):
        return KINDS[self.type]

    def validate(self) -> list[str]:
        if not self.kind.has_dropout and self.dropout:
            with_dropout = " and ".join(k for k, v in KINDS.items() if v.has_dropout)
            return [
                f"lora.dropout applies to {with_dropout}; {self.type} has no dropout on its branch, remove it"
            ]
        return []


def peft_config(cfg: LoraSettings, targets):
    """The peft config of `cfg.type`, aimed at `targets` (a regex or a list of module names)."""
    return cfg.kind.peft_config(cfg.rank, cfg.alpha, cfg.dropout, targets)


def targeted_layers(transformer: torch.nn.Module, preset: str) -> dict[str, torch.nn.Linear]:
    targets = target_modules(transformer, preset)
    if isinstance(targets, str):
        return {
            n: m
            for n, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and re.fullmatch(targets, n)
        }
    return {n: m for n, m in transformer.named_modules() if n in set(targets)}


def rank_problem(transformer: torch.nn.Module, cfg: LoraSettings) -> str | None:
    """A rank above a targeted layer's smaller side adds parameters and nothing else: say so before training."""
    layers = targeted_layers(transformer, cfg.targets)
    name, layer = min(layers.items(), key=lambda kv: min(kv[1].in_features, kv[1].out_features))
    smallest = min(layer.in_features, layer.out_features)
    if cfg.rank > smallest:
        return (
            f"lora.rank {cfg.rank} does not fit this model: the {cfg.type} targets include {name} "
            f"({layer.in_features} -> {layer.out_features}); use lora.rank <= {smallest}"
        )
    return None


def target_modules(transformer: torch.nn.Module, preset: str) -> str | list[str]:
    if preset in PRESETS:
        return PRESETS[preset]
    return sorted(
        name for name, mod in transformer.named_modules() if isinstance(mod, torch.nn.Linear)
    )


def add_lora(transformer: torch.nn.Module, cfg: LoraSettings, seed: int) -> None:
    """Inject a trainable LoRA (adapter 'default'); base weights stay frozen, LoRA weights are float32."""
    transformer.requires_grad_(False)
    torch.manual_seed(cfg.init_seed if cfg.init_seed is not None else seed)
    transformer.add_adapter(peft_config(cfg, target_modules(transformer, cfg.targets)))
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def trainable_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in transformer.parameters() if p.requires_grad]
