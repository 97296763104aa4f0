"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from common.configtree import non_negative, option, positive
from common.errors import UserError


@dataclasses.dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit"] = option("adamw", help="adamw8bit needs bitsandbytes and a GPU")
    lr: float = option(1e-4, check=positive, help="peak learning rate")
    betas: tuple[float, ...] = option(factory=lambda: (0.9, 0.999), help="AdamW betas")
    weight_decay: float = option(1e-4, check=non_negative, help="AdamW weight decay")
    eps: float = option(1e-8, check=positive, help="AdamW epsilon")
    scheduler: Literal["constant", "linear", "cosine"] = option("constant", help="decay after warmup")
    warmup_steps: int = option(0, check=non_negative, help="linear warmup steps")

    def validate(self) -> list[str]:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            return [f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}"]
        return []


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kwargs)
        except Exception as exc:  # not installed, or no usable GPU backend
            raise UserError(f"optim.name: adamw8bit needs a working bitsandbytes ({type(exc).__name__}: "
                            f"{str(exc)[:100]}); install it on a GPU machine or use optim.name: adamw") from None
    return torch.optim.AdamW(params, **kwargs)


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier on the base lr at optimizer step s (0-based): linear warmup, then constant/linear/cosine decay."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.scheduler, cfg.warmup_steps, total_steps))
