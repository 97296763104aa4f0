"""What the loop trains on, assembled once at setup: subject and regularization samples, caption variants, and
the extra loss terms (regularization weights, preservation captions)."""

from __future__ import annotations

import dataclasses
import logging

from data_tools.buckets import upscale_factor
from data_tools.captions import caption_variants
from data_tools.dataset import DataConfig, Sample, load_samples, upscaled
from trainer.config import Config
from trainer.regularization import preservation_captions
from trainer.step import Objective

log = logging.getLogger("flux2_lora.train")


@dataclasses.dataclass
class TrainingData:
    samples: list[Sample]  # subject images first, then regularization images
    captions: list[tuple[str, ...]]  # per sample: its caption variants (one, unless tags are shuffled or dropped)
    objective: Objective
    subject_count: int  # distinct subject images (the model card's dataset size)

    def prompts(self) -> set[str]:
        """Every text the loop may condition on, so the cache encodes them all before training."""
        texts = {c for variants in self.captions for c in variants}
        return texts | set((self.objective.preserve or {}).values())


def training_data(cfg: Config) -> TrainingData:
    subject = load_samples(cfg.data, cfg.train.resolutions, cfg.train.batch_size)
    reg = []
    if cfg.regularization.images:
        reg = load_samples(DataConfig(path=cfg.regularization.images, recursive=cfg.data.recursive),
                           cfg.train.resolutions, cfg.train.batch_size, key="regularization.images")
    _report_upscaling(subject + reg)
    d = cfg.data
    captions = [caption_variants(s.caption, d.trigger, shuffle=d.shuffle_tags, keep=d.keep_tags, dropout=d.tag_dropout,
                                 count=d.caption_variants, seed=cfg.train.seed + i) for i, s in enumerate(subject)]
    captions += [(s.caption,) for s in reg]  # class images keep their captions: they show the class as it is
    objective = Objective(sample_weights=[1.0] * len(subject) + [cfg.regularization.weight] * len(reg)
                          if reg else None)
    if cfg.regularization.preserve:
        objective.preserve = preservation_captions([c for variants in captions for c in variants], d.trigger,
                                                   cfg.regularization.class_prompt)
        objective.preserve_weight = cfg.regularization.preserve_weight
    return TrainingData(subject + reg, captions, objective, len({s.path for s in subject}))


def _report_upscaling(samples: list[Sample]) -> None:
    small = upscaled(samples)
    if small:
        worst = max(small, key=lambda s: upscale_factor(s.width, s.height, s.bucket))
        log.warning("%d of %d training samples are smaller than their bucket and are upscaled (most: %s, %dx%d to "
                    "%dx%d); use larger originals or a lower train.resolution", len(small), len(samples),
                    worst.path.name, worst.width, worst.height, *worst.bucket)
