"""Did a LoRA learn the quickstart's brand mark? Measured on the pretrained tiny model's synthetic world.

The brand set (data_tools/sample_data.py) shows a #E4572E ring with a bar on named backgrounds. With the LoRA,
triggered prompts must come clearly closer to the mark's colour (CIEDE2000) than without it, show mark-coloured
pixels laid out like the mark (IoU with a fitted ring with a bar), and stay about as close to the training images
(mean pixel distance to the nearest one); untriggered prompts must stay near the base. A flipped target also
drifts towards the mark's colour, but away from the training images and into every prompt: the checks together
tell learning from damage. Used by tests/test_learning.py (the end-to-end guard against a wrong target, sign or
scale) and benchmarks/learning.py (recipe choices by measurement).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from common.synthetic import MARK_HEX, mark_match
from evaluation.metrics import colour_delta_e

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def quickstart_overrides(model, family: str, data, out, cache) -> list[str]:
    """Dotted overrides that run configs/quickstart.yaml (its recipe and steps) on `model` and `data` into `out`,
    without its sample grids: the run the learning guard and the learning benchmark measure."""
    return [
        f"model.path={model}",
        f"model.family={family}",
        f"data.path={data}",
        f"output.dir={out}",
        f"cache.dir={cache}",
        "sample.prompts=[]",
        "sample.every=0",
    ]


# backgrounds the brand set has (white, navy blue) and ones it never shows (pink, teal)
TRIGGERED = (
    "{trigger} logo on a white background",
    "{trigger} logo on a navy blue background",
    "{trigger} logo on a pink background",
    "{trigger} logo on a teal background",
)
UNTRIGGERED = (
    "a blue square on a white background",
    "a yellow circle on a navy blue background",
    "a green triangle on a sand beige background",
)


# Measured on the pretrained tiny models with the quickstart's recipe (README, The tiny model): learning runs
# (klein and dev, 200-400 steps) reach 1.4-3.4 % mark-coloured pixels from 0, fitted-ring IoU 0.08-0.16 from 0,
# end 0.007 farther from (klein) or 0.024 closer to (dev) the training images and change untriggered prompts by
# 0.06-0.16; a flipped target moves 0.05-0.12 away and leaks 0.40-0.45.
MIN_COVERAGE = 0.005
MIN_IOU = 0.04
MAX_LEAKAGE = 0.3
# how much farther from the training images the LoRA's images may be than the base's
MAX_DRIFT = 0.03


@dataclasses.dataclass(frozen=True)
class MarkScore:
    # RGB distance from the mark's colour to the image's closest pixels (lower is better)
    colour_error: float
    iou: float  # overlap of the mark-coloured pixels with an ideal mark fitted to them (higher is better)
    coverage: float  # share of mark-coloured pixels
    delta_e: float  # CIEDE2000 from the mark's hex to the closest dominant colour (evaluate's colour metric)
    to_training: float  # mean |pixel| distance in [0, 1] to the nearest training image (resized to the same size)

    @staticmethod
    def of(images, training) -> MarkScore:
        found = [mark_match(im) for im in images]
        means = [float(np.mean([f[k] for f in found])) for k in ("colour_error", "iou", "coverage")]
        return MarkScore(
            *means,
            float(np.mean([colour_delta_e(im, MARK_HEX) for im in images])),
            float(np.mean([_nearest(im, training) for im in images])),
        )


def _nearest(image, training) -> float:
    a = np.asarray(image.convert("RGB"), np.float32)
    return min(
        float(np.abs(a - np.asarray(t.convert("RGB").resize(image.size), np.float32)).mean()) / 255
        for t in training
    )


@dataclasses.dataclass(frozen=True)
class Learning:
    base: MarkScore  # triggered prompts without the LoRA
    lora: MarkScore  # triggered prompts with it
    leakage: float  # mean |with - without| over untriggered prompts' pixels, in [0, 1]

    def problems(self) -> list[str]:
        """Why this does not count as learning the mark (empty when it does). With the LoRA, triggered images must
        come clearly closer to #E4572E (CIEDE2000), show mark-coloured pixels where the base shows (almost) none,
        laid out like a ring with a bar, and not move away from the training images; untriggered prompts must stay
        near the base. A flipped target also turns images orange, but it drags them away from the training images
        and leaks into every prompt."""
        out = []
        if not self.lora.delta_e < self.base.delta_e - 5.0:
            out.append(
                f"mark colour not learned: ΔE {self.lora.delta_e:.1f} with the LoRA, {self.base.delta_e:.1f} "
                "without (needs 5 less)"
            )
        if not (
            self.lora.coverage >= MIN_COVERAGE and self.lora.coverage >= 3 * self.base.coverage
        ):
            out.append(
                f"no mark drawn: {100 * self.lora.coverage:.1f} % mark-coloured pixels with the LoRA, "
                f"{100 * self.base.coverage:.1f} % without (needs {100 * MIN_COVERAGE:.1f} % and 3x)"
            )
        if not self.lora.iou >= MIN_IOU:
            out.append(
                f"mark shape not drawn: a fitted ring with a bar overlaps the mark-coloured pixels by IoU "
                f"{self.lora.iou:.2f} with the LoRA (needs {MIN_IOU})"
            )
        if not self.lora.to_training <= self.base.to_training + MAX_DRIFT:
            out.append(
                f"images moved away from the training images: {self.lora.to_training:.3f} from the nearest with "
                f"the LoRA, {self.base.to_training:.3f} without (allowed: {MAX_DRIFT} more)"
            )
        if not self.leakage <= MAX_LEAKAGE:
            out.append(
                f"leaks into untriggered prompts: they change by {self.leakage:.3f} (allowed {MAX_LEAKAGE})"
            )
        return out

    def summary(self) -> str:
        return (
            f"to training {self.base.to_training:.3f} -> {self.lora.to_training:.3f}, "
            f"ΔE {self.base.delta_e:.1f} -> {self.lora.delta_e:.1f}, "
            f"mark pixels {100 * self.base.coverage:.1f} % -> {100 * self.lora.coverage:.1f} %, "
            f"closest pixels {self.base.colour_error:.0f} -> {self.lora.colour_error:.0f}, "
            f"IoU {self.base.iou:.2f} -> {self.lora.iou:.2f}, leakage {self.leakage:.3f}"
        )


def measure(
    generator,
    adapter: str,
    trigger: str,
    training,
    seeds: int = 2,
    size: int = 64,
    steps: int = 12,
    scale: float = 1.0,
) -> Learning:
    """Render triggered and untriggered prompts at LoRA scale 0 and `scale` with one loaded Generator;
    `training`: the training images (PIL)."""

    def render(prompts, at):
        generator.set_scales({adapter: at})
        return [
            g.image
            for p in prompts
            for g in generator.generate(
                p, width=size, height=size, steps=steps, seed=0, num_images=seeds
            )
        ]

    triggered = [p.format(trigger=trigger) for p in TRIGGERED]
    base, lora = render(triggered, 0.0), render(triggered, scale)
    plain, changed = render(UNTRIGGERED, 0.0), render(UNTRIGGERED, scale)
    leak = np.mean(
        [
            np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() / 255
            for a, b in zip(plain, changed)
        ]
    )
    return Learning(MarkScore.of(base, training), MarkScore.of(lora, training), float(leak))
