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
    batch_size: int = option(1, check=positive, help="images per micro-batch (one aspect bucket each)")
    resolution: int | list[int] = option(1024, check=_resolutions_problem,
                                         help="bucket area is resolution^2; a list trains every image at each size "
                                              "(multi-resolution, e.g. [512, 768, 1024])")
    seed: int = option(42, help="seeds LoRA init, batch order, noise, timesteps and caption dropout")
    gradient_accumulation: int = option(1, check=positive, help="micro-batches per optimizer step")
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", help="autocast for the forward pass (fp16 needs a GPU)")
    gradient_checkpointing: bool = option(False, help="recompute activations in backward: less memory, ~30% slower")
    guidance: float = option(1.0, check=non_negative, help="embedded guidance during training (dev only)")
    caption_dropout: float = option(0.05, check=probability, help="share of samples trained on the empty prompt")
    max_grad_norm: float = option(1.0, check=non_negative, help="0 disables clipping")
    nonfinite: Literal["skip", "stop"] = option("stop", help="what a NaN/inf loss does")
    log_every: int = option(1, check=positive, help="steps between progress-bar/tracker updates")

    @property
    def resolutions(self) -> list[int]:
        return [self.resolution] if isinstance(self.resolution, int) else sorted(set(self.resolution))


# Strides of the per-micro-batch seed: distinct (seed, micro-batch, rank) give distinct seeds for runs of up to
# a million micro-batches on up to 4,099 ranks (both primes, so neighbouring seeds do not line up either).
MICRO_BATCH_STRIDE = 1_000_003
RANK_STRIDE = 4_099


def step_generator(seed: int, micro_batch: int, rank: int) -> torch.Generator:
    """Noise, sigmas and caption dropout of a micro-batch depend on (seed, micro-batch, rank) only: resume is exact."""
    return torch.Generator().manual_seed((seed * MICRO_BATCH_STRIDE + micro_batch) * RANK_STRIDE + rank)


def micro_batch_loss(
    transformer,
    family: Family,
    features: Features,
    captions: list[str],
    indices: list[int],
    settings: TrainSettings,
    flow: FlowConfig,
    generator: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    drop = torch.rand(len(indices), generator=generator) < settings.caption_dropout
    texts = ["" if d else captions[i] for i, d in zip(indices, drop.tolist())]
    x0 = torch.cat([features.latents[i] for i in indices]).to(device=device, dtype=dtype)
    embeds = torch.cat([features.embeds[t] for t in texts]).to(device=device, dtype=dtype)
    x0_tokens = family.pipeline_class._pack_latents(x0)  # (B, 128, h, w) -> (B, h*w, 128)
    noise = torch.randn(x0_tokens.shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    sigmas = training_sigmas(flow, len(indices), x0_tokens.shape[1], generator).to(device)
    references = [torch.cat([features.references[i][k] for i in indices]).to(device=device, dtype=dtype)
                  for k in range(len(features.references[indices[0]]))]
    inputs = build_inputs(family, interpolate(x0_tokens, noise, sigmas), x0.shape, embeds, references)
    pred = predict_velocity(transformer, family, inputs, sigmas, settings.guidance)
    return flow_loss(pred, velocity_target(x0_tokens, noise), loss_weights(flow.loss_weighting, sigmas),
                     settings.batch_size)
