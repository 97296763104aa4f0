"""Rectified-flow (flow-matching) maths as pure functions, and the config section that picks them.

Convention (the pipelines'): sigma in [0, 1]; sigma = 1 is pure noise. x_t = (1 - sigma) * x0 + sigma * noise,
the model predicts the velocity noise - x0, and the transformer's `timestep` argument is sigma itself
(it multiplies by 1000 inside). This matches `FlowMatchEulerDiscreteScheduler.scale_noise` and `.step`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

from common.configtree import option, positive, probability

MIGRATED_RESOLUTION = (
    "'resolution' (FLUX.2's inference schedule) is now called 'empirical'; the new default, "
    "'dynamic', is the shift FLUX.2 was trained with: remove the key, or set empirical to keep the "
    "old behaviour"
)


@dataclasses.dataclass
class FlowConfig:
    timestep_sampling: Literal["uniform", "logit_normal"] = option(
        "logit_normal", help="how training sigmas are drawn"
    )
    logit_mean: float = option(0.0, help="logit-normal mean (> 0 favours noisier sigmas)")
    logit_std: float = option(1.0, check=positive, help="logit-normal spread")
    # Larger images need more noise to destroy their structure, so sigmas are shifted by image size. BFL confirmed
    # FLUX.2 was trained with FLUX.1's shift (OneTrainer PR #1516): "dynamic". The pipelines' compute_empirical_mu
    # is a *sampling* schedule (7.56 at 1024^2 against 3.16, and not monotonic in size): "empirical", on request only.
    shift: Literal["dynamic", "fixed", "none", "empirical"] = option(
        "dynamic",
        migrations={"resolution": MIGRATED_RESOLUTION},
        help="time shift of the sampled sigmas, per bucket: dynamic = FLUX.1's resolution-dependent shift FLUX.2 was "
        "trained with (mu linear in image tokens, 0.5 at 256 to 1.15 at 4096; shift e^mu = 3.16 at 1024^2); "
        "fixed = shift_value; none; empirical = the pipelines' inference schedule (not how FLUX.2 was trained)",
    )
    shift_value: float = option(3.0, check=positive, help="the shift factor when shift: fixed")
    shift_reference_steps: int = option(
        50,
        check=positive,
        help="sampling steps fed to compute_empirical_mu (shift: empirical only)",
    )
    sigma_min: float = option(
        0.0,
        check=probability,
        help="lowest training sigma: shifted sigmas are rescaled into [sigma_min, sigma_max]",
    )
    sigma_max: float = option(
        1.0, check=probability, help="highest training sigma (1 = pure noise)"
    )
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = option(
        "none", help="per-sample loss weight by sigma"
    )

    def validate(self) -> list[str]:
        if self.sigma_min >= self.sigma_max:
            return [
                f"flow.sigma_min ({self.sigma_min}) must be below flow.sigma_max ({self.sigma_max})"
            ]
        return []


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise, with sigma broadcast over all but the batch dimension."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def sample_sigmas(
    kind: str, batch: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """Training sigmas in (0, 1): uniform, or logit-normal (sigmoid of N(mean, std)) which favours mid noise."""
    if kind == "uniform":
        return torch.rand(batch, generator=generator)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(batch, generator=generator) * std + mean)
    raise ValueError(f"unknown timestep sampling {kind!r}")


def time_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = s*sigma / (1 + (s-1)*sigma): the scheduler's exponential time shift with s = exp(mu)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def dynamic_mu(image_seq_len: int) -> float:
    """FLUX.1's resolution-dependent mu (diffusers' `calculate_shift`, imported, not copied): 0.5 at 256 image
    tokens, 1.15 at 4096, linear in between and beyond."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(
        image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15
    )


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's resolution-dependent mu (the pipelines' `compute_empirical_mu`, imported, not copied)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)


def shift_factor(cfg: FlowConfig, image_seq_len: int) -> float:
    if cfg.shift == "none":
        return 1.0
    if cfg.shift == "fixed":
        return cfg.shift_value
    if cfg.shift == "dynamic":
        return math.exp(dynamic_mu(image_seq_len))
    return math.exp(empirical_mu(image_seq_len, cfg.shift_reference_steps))


def training_sigmas(
    cfg: FlowConfig, batch: int, image_seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    sigmas = sample_sigmas(cfg.timestep_sampling, batch, generator, cfg.logit_mean, cfg.logit_std)
    shifted = time_shift(sigmas, shift_factor(cfg, image_seq_len))
    return cfg.sigma_min + (cfg.sigma_max - cfg.sigma_min) * shifted


def loss_weights(kind: str, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights. sigma_sqrt: 1/sigma^2 (SD3), clamped; cosmap: 2 / (pi (1 - 2s + 2s^2))."""
    if kind == "none":
        return torch.ones_like(sigma)
    if kind == "sigma_sqrt":
        return (sigma.clamp_min(1e-3) ** -2.0).clamp_max(1e3)
    if kind == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ValueError(f"unknown loss weighting {kind!r}")


def flow_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    batch_size: int | None = None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted MSE, averaged per sample first so every image counts the same whatever its size, then summed and
    divided by the *configured* batch size: an image in a short batch (a bucket's remainder) weighs what any
    other does, instead of double. `token_weights` (B, N) masks tokens (masked loss): the mean is over the
    weighted tokens."""
    error = ((pred.float() - target.float()) ** 2).mean(-1)  # (B, N)
    if token_weights is None:
        per_sample = error.mean(1)
    else:
        w = token_weights.to(error)
        per_sample = (error * w).sum(1) / w.sum(1).clamp_min(1e-6)
    return (weights.to(per_sample) * per_sample).sum() / (batch_size or len(per_sample))
