"""Held-out validation loss: the flow-matching loss on images the LoRA never trains on, at fixed sigmas and fixed
noise, so the number is comparable between steps, checkpoints and runs (training loss is too noisy for that)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import torch

from common.atomic import atomic_path
from common.configtree import non_negative, option, probability
from trainer.step import Batch, BatchSource, batch_loss


@dataclasses.dataclass
class ValidationConfig:
    images: str | None = option(None, help="a folder of captioned images held out for validation")
    split: float = option(
        0.0, check=probability, help="or: this share of data.path held out (at least one image)"
    )
    every: int = option(
        0,
        check=non_negative,
        help="steps between validation losses (0: only at the end, if any "
        "validation images are set)",
    )
    sigmas: list[float] = option(
        factory=lambda: [0.2, 0.4, 0.6, 0.8], help="the fixed sigmas the loss is averaged over"
    )

    def validate(self) -> list[str]:
        if self.images and self.split:
            return ["validation.images and validation.split both hold images out; choose one"]
        if any(not 0 < s < 1 for s in self.sigmas) or not self.sigmas:
            return [f"validation.sigmas must be numbers between 0 and 1, got {self.sigmas}"]
        return []

    @property
    def enabled(self) -> bool:
        return bool(self.images or self.split)


@torch.no_grad()
def validation_loss(
    transformer, source: BatchSource, indices: list[int], sigmas: list[float]
) -> float:
    """Mean loss over the held-out samples x sigmas: the training loss (trainer/step.py) at fixed sigmas, under each
    sample's own caption, with noise seeded by the sample's position, so the number is fixed forever."""
    was_training = transformer.training
    transformer.eval()
    total = 0.0
    for k, i in enumerate(indices):
        x0 = source.features.latents[i].to(device=source.device, dtype=source.dtype)
        tokens = source.family.pipeline_class._pack_latents(x0)
        noise = torch.randn(
            tokens.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float32
        )
        for sigma in sigmas:
            batch = Batch(
                x0=x0,
                tokens=tokens,
                noise=noise.to(device=source.device, dtype=source.dtype),
                sigmas=torch.tensor([sigma], device=source.device),
                embeds=source.features.embeds[source.captions[i][0]].to(
                    device=source.device, dtype=source.dtype
                ),
                references=[
                    r.to(device=source.device, dtype=source.dtype)
                    for r in source.features.references[i]
                ],
                weights=torch.ones(1, device=source.device),
            )
            total += batch_loss(
                transformer, source.family, batch, source.settings.guidance, 1
            ).item()
    transformer.train(was_training)
    return total / (len(indices) * len(sigmas))


def write_curve(out_dir: Path, history: list[tuple[int, float]]) -> None:
    """validation.csv and validation.png (loss against step) beside the outputs."""
    with (
        atomic_path(out_dir / "validation.csv") as tmp,
        open(tmp, "w", newline="", encoding="utf-8") as fh,
    ):
        writer = csv.writer(fh)
        writer.writerow(["step", "validation_loss"])
        writer.writerows(history)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot([s for s, _ in history], [v for _, v in history], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (lower is better)")
    ax.set_title("held-out loss at fixed sigmas and noise", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_dir / "validation.png") as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
