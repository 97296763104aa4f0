"""One micro-batch of the flow-matching objective, and the `train` config section it reads."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from common.configtree import non_negative, option, positive, probability
from common.limits import side_problem
from inference.conditioning import build_inputs, predict_velocity
from inference.families import Family
from trainer.cache import Features
from trainer.flow import (
    FlowConfig,
    flow_loss,
    interpolate,
    loss_weights,
    training_sigmas,
    velocity_target,
)


def _resolutions_problem(value: int | list[int]) -> str | None:
    values = [value] if isinstance(value, int) else value
    if not values:
        return "must be a size or a list of sizes, got an empty list"
    return next((p for p in map(side_problem, values) if p), None)


@dataclasses.dataclass
class TrainSettings:
    steps: int = option(1000, check=positive, help="optimizer steps")
    batch_size: int = option(
        1, check=positive, help="images per micro-batch (one aspect bucket each)"
    )
    resolution: int | list[int] = option(
        1024,
        check=_resolutions_problem,
        help="bucket area is resolution^2; a list trains every image at each size "
        "(multi-resolution, e.g. [512, 768, 1024])",
    )
    seed: int = option(
        42, help="seeds LoRA init, batch order, noise, timesteps and caption dropout"
    )
    gradient_accumulation: int = option(1, check=positive, help="micro-batches per optimizer step")
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "no", help="autocast for the forward pass (fp16 needs a GPU)"
    )
    sharding: Literal["none", "fsdp"] = option(
        "none",
        help="fsdp: shard the frozen transformer and the LoRA over the processes (FSDP2), each holding 1/N; "
        "needs 2+ processes (configs/accelerate/fsdp.yaml)",
    )
    process_timeout: int = option(
        60,
        check=positive,
        help="minutes a process waits for the others at a collective (the cache fill, checkpoints) before the "
        "run counts as hung; NCCL's own default, 10, is shorter than a large cache fill",
    )
    gradient_checkpointing: bool = option(
        False, help="recompute activations in backward: less memory, ~30% slower"
    )
    guidance: float = option(
        1.0, check=non_negative, help="embedded guidance during training (dev only)"
    )
    caption_dropout: float = option(
        0.05, check=probability, help="share of samples trained on the empty prompt"
    )
    max_grad_norm: float = option(1.0, check=non_negative, help="0 disables clipping")
    nonfinite: Literal["skip", "stop"] = option("stop", help="what a NaN/inf loss does")
    log_every: int = option(1, check=positive, help="steps between progress-bar/tracker updates")

    @property
    def resolutions(self) -> list[int]:
        return (
            [self.resolution] if isinstance(self.resolution, int) else sorted(set(self.resolution))
        )


# seeds of distinct runs stay apart for up to a billion micro-batches (a prime stride)
GLOBAL_STRIDE = 1_000_000_007


def step_generator(seed: int, global_micro_batch: int) -> torch.Generator:
    """Noise, sigmas and caption dropout of a micro-batch depend on (seed, its global number) only, the number
    counted over all ranks (micro-batch m of rank r is global m * world + r, as the batch plan numbers them): resume
    is exact, and N ranks compute what one process does with N-step gradient accumulation."""
    return torch.Generator().manual_seed(seed * GLOBAL_STRIDE + global_micro_batch)


@dataclasses.dataclass
class Objective:
    """What a micro-batch's loss holds besides plain flow matching (all optional)."""

    # per sample (regularization images weigh regularization.weight)
    sample_weights: list[float] | None = None
    # caption -> caption with the trigger replaced by the class prompt
    preserve: dict[str, str] | None = None
    preserve_weight: float = 1.0
    # the unwrapped transformer, to switch its adapter off
    plain_model: torch.nn.Module | None = None


def micro_batch_loss(
    transformer,
    family: Family,
    features: Features,
    captions: list[tuple[str, ...]],
    indices: list[int],
    settings: TrainSettings,
    flow: FlowConfig,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
    objective: Objective | None = None,
) -> torch.Tensor:
    """`captions[i]`: sample i's caption variants (one unless tags are shuffled or dropped); one is drawn."""
    objective = objective or Objective()
    drop = torch.rand(len(indices), generator=generator) < settings.caption_dropout
    chosen = [
        captions[i][0]
        if len(captions[i]) == 1
        else captions[i][int(torch.randint(len(captions[i]), (1,), generator=generator))]
        for i in indices
    ]
    texts = ["" if d else c for c, d in zip(chosen, drop.tolist())]
    x0 = torch.cat([features.latents[i] for i in indices]).to(device=device, dtype=dtype)
    embeds = torch.cat([features.embeds[t] for t in texts]).to(device=device, dtype=dtype)
    x0_tokens = family.pipeline_class._pack_latents(x0)  # (B, 128, h, w) -> (B, h*w, 128)
    noise = torch.randn(x0_tokens.shape, generator=generator, dtype=torch.float32).to(
        device=device, dtype=dtype
    )
    sigmas = training_sigmas(flow, len(indices), x0_tokens.shape[1], generator).to(device)
    references = [
        torch.cat([features.references[i][k] for i in indices]).to(device=device, dtype=dtype)
        for k in range(len(features.references[indices[0]]))
    ]
    noisy = interpolate(x0_tokens, noise, sigmas)
    inputs = build_inputs(family, noisy, x0.shape, embeds, references)
    pred = predict_velocity(transformer, family, inputs, sigmas, settings.guidance)
    weights = loss_weights(flow.loss_weighting, sigmas)
    if objective.sample_weights is not None:
        weights = weights * torch.tensor(
            [objective.sample_weights[i] for i in indices], device=weights.device
        )
    masks = [features.masks[i] for i in indices] if features.masks else None
    token_weights = torch.cat(masks).to(device) if masks else None
    loss = flow_loss(
        pred, velocity_target(x0_tokens, noise), weights, settings.batch_size, token_weights
    )
    if objective.preserve:
        # the same noisy image under the caption without the trigger: the LoRA should predict what the base does
        kept = torch.cat([features.embeds[objective.preserve[c]] for c in chosen]).to(
            device=device, dtype=dtype
        )
        kept_inputs = build_inputs(family, noisy, x0.shape, kept, references)
        with torch.no_grad():
            objective.plain_model.disable_adapters()
            try:
                target = predict_velocity(
                    objective.plain_model, family, kept_inputs, sigmas, settings.guidance
                )
            finally:
                objective.plain_model.enable_adapters()
        kept_pred = predict_velocity(transformer, family, kept_inputs, sigmas, settings.guidance)
        loss = loss + objective.preserve_weight * flow_loss(
            kept_pred, target, torch.ones_like(weights), settings.batch_size
        )
    return loss
