"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from common.configtree import non_negative, option, positive
from common.extras import extra_problem


@dataclasses.dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit", "prodigy"] = option(
        "adamw",
        help="adamw; adamw8bit (bitsandbytes, GPU only: optimizer state in 8 bits); prodigy (prodigyopt: "
        "estimates the step size itself; set optim.lr: 1.0, a multiplier on its estimate)",
    )
    lr: float = option(
        1e-4, check=positive, help="peak learning rate (with prodigy: 1.0 = its own estimate)"
    )
    betas: tuple[float, ...] = option(factory=lambda: (0.9, 0.999), help="AdamW betas")
    weight_decay: float = option(1e-4, check=non_negative, help="AdamW weight decay")
    eps: float = option(1e-8, check=positive, help="AdamW epsilon")
    scheduler: Literal["constant", "linear", "cosine"] = option(
        "constant", help="decay after warmup"
    )
    warmup_steps: int = option(0, check=non_negative, help="linear warmup steps")

    def validate(self) -> list[str]:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            return [f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}"]
        return []


def optimizer_problem(cfg: OptimConfig) -> str | None:
    """What would stop the optimizer from being built, found before any weights load."""
    if cfg.name == "adamw8bit":
        if not torch.cuda.is_available():
            return "optim.name: adamw8bit runs on a CUDA GPU only; use optim.name: adamw on this machine"
        return extra_problem("bnb", "optim.name: adamw8bit")
    if cfg.name == "prodigy":
        if problem := extra_problem("prodigy", "optim.name: prodigy"):
            return problem
        if cfg.lr < 0.1:
            return (
                f"optim.lr {cfg.lr:g} with prodigy scales its own step-size estimate down {1 / cfg.lr:.0f}x; "
                "prodigy wants optim.lr: 1.0 (or 0.5-2)"
            )
    return None


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
    if cfg.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    if cfg.name == "prodigy":
        from prodigyopt import Prodigy

        # safeguard_warmup keeps the estimate from running away during lr warmup; bias correction as in Adam
        return Prodigy(
            params, **kwargs, use_bias_correction=True, safeguard_warmup=cfg.warmup_steps > 0
        )
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
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.scheduler, cfg.warmup_steps, total_steps)
    )
