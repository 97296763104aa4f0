"""What the loop trains on, assembled once at setup: subject and regularization samples, caption variants, and
the extra loss terms (regularization weights, preservation captions)."""

from __future__ import annotations

import dataclasses
import logging
import random

from common.errors import UserError
from data_tools.buckets import upscale_factor
from data_tools.captions import caption_variants
from data_tools.dataset import DataConfig, Sample, load_samples, upscaled
from trainer.config import Config
from trainer.regularization import preservation_captions
from trainer.step import Objective

log = logging.getLogger("flux2_lora.train")


@dataclasses.dataclass
class TrainingData:
    # subject images, then regularization images, then held-out validation images
    samples: list[Sample]
    # per sample: its caption variants (one, unless tags are shuffled or dropped)
    captions: list[tuple[str, ...]]
    objective: Objective
    subject_count: int  # distinct subject images (the model card's dataset size)
    train_count: int  # samples[:train_count] are trained on; the rest are validation

    @property
    def validation_indices(self) -> list[int]:
        return list(range(self.train_count, len(self.samples)))

    def prompts(self) -> set[str]:
        """Every text the loop may condition on, so the cache encodes them all before training."""
        texts = {c for variants in self.captions for c in variants}
        return texts | set((self.objective.preserve or {}).values())


def training_data(cfg: Config) -> TrainingData:
    subject = load_samples(cfg.data, cfg.train.resolutions, cfg.train.batch_size)
    reg = []
    if cfg.regularization.images:
        reg = load_samples(
            DataConfig(path=cfg.regularization.images, recursive=cfg.data.recursive),
            cfg.train.resolutions,
            cfg.train.batch_size,
            key="regularization.images",
        )
    subject, held = _hold_out(cfg, subject)
    _report_upscaling(subject + reg)
    d = cfg.data
    captions = [
        caption_variants(
            s.caption,
            d.trigger,
            shuffle=d.shuffle_tags,
            keep=d.keep_tags,
            dropout=d.tag_dropout,
            count=d.caption_variants,
            seed=cfg.train.seed + i,
        )
        for i, s in enumerate(subject)
    ]
    # class and held-out images keep their captions as they are
    captions += [(s.caption,) for s in reg + held]
    objective = Objective(
        sample_weights=[1.0] * len(subject) + [cfg.regularization.weight] * len(reg)
        if reg
        else None
    )
    if cfg.regularization.preserve:
        objective.preserve = preservation_captions(
            [c for variants in captions for c in variants],
            d.trigger,
            cfg.regularization.class_prompt,
        )
        objective.preserve_weight = cfg.regularization.preserve_weight
    _check_batch_fits(cfg.train.batch_size, subject + reg)
    return TrainingData(
        subject + reg + held,
        captions,
        objective,
        len({s.path for s in subject}),
        len(subject) + len(reg),
    )


def _hold_out(cfg: Config, subject: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """(training samples, validation samples): validation.images, or validation.split of the images (seeded)."""
    v = cfg.validation
    if v.images:
        return subject, load_samples(
            DataConfig(path=v.images, trigger=cfg.data.trigger),
            cfg.train.resolutions[-1],
            key="validation.images",
        )
    if not v.split:
        return subject, []
    paths = sorted({s.path for s in subject})
    if len(paths) < 2:
        raise UserError("validation.split needs at least two images in data.path (one to train on)")
    held = set(
        random.Random(cfg.train.seed).sample(
            paths, min(len(paths) - 1, max(1, round(v.split * len(paths))))
        )
    )
    validation = list({(s.path, s.bucket): s for s in subject if s.path in held}.values())
    return [s for s in subject if s.path not in held], validation


def _report_upscaling(samples: list[Sample]) -> None:
    small = upscaled(samples)
    if small:
        worst = max(small, key=lambda s: upscale_factor(s.width, s.height, s.bucket))
        images = len({s.path for s in samples})
        # with several resolutions a sample is an image at one size: say so, or "33 of 33" reads as 33 images
        counted = (
            ""
            if images == len(samples)
            else f" ({images} images at {len(samples) / images:g} sizes each)"
        )
        log.warning(
            "%d of %d training samples%s are smaller than their bucket and are upscaled (most: %s, %dx%d to "
            "%dx%d); use larger originals or a lower train.resolution",
            len(small),
            len(samples),
            counted,
            worst.path.name,
            worst.width,
            worst.height,
            *worst.bucket,
        )


def _check_batch_fits(batch_size: int, samples: list[Sample]) -> None:
    """A batch holds one bucket. When no bucket has `batch_size` samples, every batch would be smaller than
    asked while the loss is still divided by `batch_size` (trainer/flow.py weighs a short batch's images as
    full ones): a silent smaller learning rate. Refuse, naming the size that fits."""
    counts: dict[tuple, int] = {}
    for s in samples:
        counts[s.bucket] = counts.get(s.bucket, 0) + 1
    largest = max(counts.values(), default=0)
    if largest < batch_size:
        raise UserError(
            f"train.batch_size {batch_size} is more than any bucket holds: the largest has {largest} of the "
            f"{len(samples)} training samples, so no batch could be full; set train.batch_size={largest} or "
            "lower (train.gradient_accumulation raises the effective batch)"
        )
