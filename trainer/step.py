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


@dataclasses.dataclass
class Batch:
    """One micro-batch as the transformer sees it, however it was drawn (training, validation)."""

    x0: torch.Tensor  # (B, 128, h, w) normalised latents
    tokens: torch.Tensor  # the same packed: (B, h*w, 128)
    noise: torch.Tensor  # (B, h*w, 128)
    sigmas: torch.Tensor  # (B,)
    embeds: torch.Tensor  # (B, L, D) prompt embeddings
    references: list[torch.Tensor]  # per reference image: (B, 128, h_k, w_k)
    weights: torch.Tensor  # (B,) per-sample loss weights
    token_weights: torch.Tensor | None = None  # (B, h*w) from masks
    preserve_embeds: torch.Tensor | None = (
        None  # the captions with the class prompt for the trigger
    )


def predict(
    transformer, family: Family, batch: Batch, guidance: float, embeds: torch.Tensor | None = None
):
    """The transformer's velocity for the batch's noisy latents, under its own or the given embeddings."""
    noisy = interpolate(batch.tokens, batch.noise, batch.sigmas)
    inputs = build_inputs(
        family, noisy, batch.x0.shape, batch.embeds if embeds is None else embeds, batch.references
    )
    return predict_velocity(transformer, family, inputs, batch.sigmas, guidance)


def batch_loss(
    transformer, family: Family, batch: Batch, guidance: float, per: int
) -> torch.Tensor:
    """The flow-matching loss of a batch: the one loss training and validation compute. `per`: what the summed
    loss is divided by (the configured batch size, so a bucket's short last batch weighs each image the same)."""
    target = velocity_target(batch.tokens, batch.noise)
    return flow_loss(
        predict(transformer, family, batch, guidance),
        target,
        batch.weights,
        per,
        batch.token_weights,
    )


@dataclasses.dataclass
class BatchSource:
    """Draws micro-batches from what the loop trains on. A batch's caption variants, caption dropout, noise and
    sigmas come from its generator alone (seeded by its global number), so resume and several ranks draw alike."""

    features: Features
    captions: list[
        tuple[str, ...]
    ]  # per sample: its caption variants (one unless tags are shuffled or dropped)
    settings: TrainSettings
    flow: FlowConfig
    objective: Objective
    family: Family
    dtype: torch.dtype
    device: torch.device

    def _to(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype)

    def draw(self, indices: list[int], generator: torch.Generator) -> Batch:
        f, settings = self.features, self.settings
        drop = torch.rand(len(indices), generator=generator) < settings.caption_dropout
        chosen = [
            self.captions[i][0]
            if len(self.captions[i]) == 1
            else self.captions[i][
                int(torch.randint(len(self.captions[i]), (1,), generator=generator))
            ]
            for i in indices
        ]
        texts = ["" if d else c for c, d in zip(chosen, drop.tolist())]
        x0 = self._to(torch.cat([f.latents[i] for i in indices]))
        tokens = self.family.pipeline_class._pack_latents(x0)  # (B, 128, h, w) -> (B, h*w, 128)
        noise = self._to(torch.randn(tokens.shape, generator=generator, dtype=torch.float32))
        sigmas = training_sigmas(self.flow, len(indices), tokens.shape[1], generator).to(
            self.device
        )
        weights = loss_weights(self.flow.loss_weighting, sigmas)
        if self.objective.sample_weights is not None:
            weights = weights * torch.tensor(
                [self.objective.sample_weights[i] for i in indices], device=weights.device
            )
        preserve = self.objective.preserve
        return Batch(
            x0=x0,
            tokens=tokens,
            noise=noise,
            sigmas=sigmas,
            embeds=self._to(torch.cat([f.embeds[t] for t in texts])),
            references=[
                self._to(torch.cat([f.references[i][k] for i in indices]))
                for k in range(len(f.references[indices[0]]))
            ],
            weights=weights,
            token_weights=torch.cat([f.masks[i] for i in indices]).to(self.device)
            if f.masks
            else None,
            preserve_embeds=self._to(torch.cat([f.embeds[preserve[c]] for c in chosen]))
            if preserve
            else None,
        )


def micro_batch_loss(
    transformer, plain, source: BatchSource, indices: list[int], generator: torch.Generator
) -> torch.Tensor:
    """The loss of micro-batch `indices`: flow matching, plus with preservation the class-prompt prediction pulled
    to the base model's. `plain`: the unwrapped transformer (its adapter is switched off for the base's)."""
    settings, family = source.settings, source.family
    batch = source.draw(indices, generator)
    loss = batch_loss(transformer, family, batch, settings.guidance, settings.batch_size)
    if batch.preserve_embeds is not None:
        # the same noisy image under the caption without the trigger: the LoRA should predict what the base does
        with torch.no_grad():
            plain.disable_adapters()
            try:
                target = predict(plain, family, batch, settings.guidance, batch.preserve_embeds)
            finally:
                plain.enable_adapters()
        kept = predict(transformer, family, batch, settings.guidance, batch.preserve_embeds)
        loss = loss + source.objective.preserve_weight * flow_loss(
            kept, target, torch.ones_like(batch.weights), settings.batch_size
        )
    return loss
