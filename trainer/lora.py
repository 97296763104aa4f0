"""LoRA on the FLUX.2 transformer through peft, with target presets named after FLUX.2's real modules."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from common.configtree import option, positive, probability

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
    rank: int = option(16, check=positive, help="LoRA rank r")
    alpha: float = option(16.0, check=positive, help="scale = alpha / rank")
    dropout: float = option(0.0, check=probability, help="dropout on the LoRA branch")
    targets: Literal["attention", "attention_mlp", "all_linear"] = option(
        "attention_mlp", help="all_linear adds every other Linear: modulation, embedders, proj_out"
    )
    init_seed: int | None = option(None, help="seed for LoRA init; defaults to train.seed")


def target_modules(transformer: torch.nn.Module, preset: str) -> str | list[str]:
    if preset in PRESETS:
        return PRESETS[preset]
    return sorted(name for name, mod in transformer.named_modules() if isinstance(mod, torch.nn.Linear))


def add_lora(transformer: torch.nn.Module, cfg: LoraSettings, seed: int) -> None:
    """Inject a trainable LoRA (adapter 'default'); base weights stay frozen, LoRA weights are float32."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    torch.manual_seed(cfg.init_seed if cfg.init_seed is not None else seed)
    transformer.add_adapter(
        LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            init_lora_weights=True,
            target_modules=target_modules(transformer, cfg.targets),
        )
    )
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def trainable_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in transformer.parameters() if p.requires_grad]
