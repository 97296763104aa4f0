"""The one preflight step: every check that needs more than the config itself (the model's files, the data, the
installed packages, the hardware, the processes) runs here, before any weights load, and every problem found is
reported at once (common.errors.refuse). What depends on the config alone is the config tree's (trainer/config.py).
Called by train (everything), plan and rehearse (the model and, for rehearse, this machine), and the studio.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

from common.errors import UserError, refuse
from inference.loading import BaseModel, resolve_base_model
from inference.quantize import quantize_problem
from trainer.config import Config
from trainer.lora import rank_problem
from trainer.optim import optimizer_problem
from trainer.outputs import tracker_problem
from trainer.training_data import TrainingData, training_data

log = logging.getLogger("flux2_lora.train")


@dataclasses.dataclass(frozen=True)
class Checked:
    """What the preflight read and a run goes on with."""

    base: BaseModel | None
    data: TrainingData | None


def distilled_problem(base: BaseModel, allowed: bool) -> str | None:
    """Step-distilled checkpoints learn LoRAs badly (weak or grey results, reported by users of every trainer)."""
    if not base.distilled or allowed:
        return None
    variant = base.family.variant(base.transformer_config())
    return (
        f"model.path '{base.path}' is a step-distilled FLUX.2 {base.family.name} checkpoint, and LoRAs trained on "
        f"one come out weak or grey; train on the base checkpoint ({variant.base_model}) and use the LoRA on either, "
        "or set model.allow_distilled: true"
    )


def preflight(
    cfg: Config, *, data: bool = True, machine: bool = True, accelerator: Any = None
) -> Checked:
    """Check `cfg` against the world. `data`: read the data set (train); `machine`: this machine's packages and
    devices (off for `plan`, which plans hardware it may not be on); `accelerator`: the launched processes
    (train: sharding and the memory plan for them)."""
    problems: list[str] = []

    def check(find: Callable[[], Any]) -> Any:
        """Run one check: a problem it returns or raises is kept, and the run goes on to the next check."""
        try:
            found = find()
        except UserError as exc:
            problems.append(str(exc))
            return None
        if isinstance(found, str):
            problems.append(found)
            return None
        return found

    base = check(lambda: resolve_base_model(cfg.model))
    if base is not None:
        check(lambda: distilled_problem(base, cfg.model.allow_distilled))
        check(lambda: rank_problem(base.empty_transformer(), cfg.lora))
    if machine:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        check(lambda: optimizer_problem(cfg.optim))
        check(lambda: quantize_problem(cfg.model.quantize, "model.quantize", device))
        cache_device = "cpu" if cfg.cache.device == "cpu" else device
        check(
            lambda: quantize_problem(
                cfg.model.text_encoder_quantize, "model.text_encoder_quantize", cache_device
            )
        )
        if cfg.train.mixed_precision == "fp16" and device != "cuda":
            problems.append(
                "train.mixed_precision: fp16 needs a CUDA GPU; use bf16 or no on this machine"
            )
    checked_data = check(lambda: training_data(cfg)) if data else None
    if data:
        check(lambda: tracker_problem(cfg.output))
    if accelerator is not None and base is not None:
        from trainer import sharding
        from trainer.memory import memory_problem

        if sharding.requested(cfg.train.sharding, accelerator):
            check(lambda: sharding.sharding_problem(accelerator, cfg))
        check(lambda: memory_problem(cfg, base, accelerator.num_processes, accelerator.device.type))
    refuse(problems)
    if not cfg.lora.kind.stock_diffusers:  # said before the hours of training, not after
        log.warning(
            f"lora.type: {cfg.lora.type}: stock diffusers' load_lora_weights refuses these files; flux2-lora "
            "loads them, "
            "and `flux2-lora export --format comfyui|kohya|bfl` writes what ComfyUI, musubi-tuner and "
            "ai-toolkit read"
        )
    return Checked(base, checked_data)
