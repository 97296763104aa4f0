"""Did a LoRA learn the quickstart's brand mark? Measured on the pretrained tiny model's synthetic world.

The brand set (data_tools/sample_data.py) shows a #E4572E ring with a bar on named backgrounds. With the LoRA,
triggered prompts must show the mark (its colour close, its shape fitted) where the base shows none, and
untriggered prompts must stay close to what the base draws. Used by tests/test_learning.py (the end-to-end guard
against a wrong target, sign or scale) and benchmarks/learning.py (recipe choices by measurement).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from common.synthetic import MARK_HEX, mark_match
from evaluation.metrics import colour_delta_e

# backgrounds the brand set has (white, navy blue) and ones it never shows (pink, teal)
TRIGGERED = ("{trigger} logo on a white background", "{trigger} logo on a navy blue background",
             "{trigger} logo on a pink background", "{trigger} logo on a teal background")
UNTRIGGERED = ("a blue square on a white background", "a yellow circle on a navy blue background",
               "a green triangle on a sand beige background")


@dataclasses.dataclass(frozen=True)
class MarkScore:
    colour_error: float  # RGB distance from the mark's colour to the image's closest pixels (lower is better)
    iou: float  # overlap of the mark-coloured pixels with an ideal mark fitted to them (higher is better)
    coverage: float  # share of mark-coloured pixels
    delta_e: float  # CIEDE2000 from the mark's hex to the closest dominant colour (evaluate's colour metric)

    @staticmethod
    def of(images) -> "MarkScore":
        found = [mark_match(im) for im in images]
        means = [float(np.mean([f[k] for f in found])) for k in ("colour_error", "iou", "coverage")]
        return MarkScore(*means, float(np.mean([colour_delta_e(im, MARK_HEX) for im in images])))


@dataclasses.dataclass(frozen=True)
class Learning:
    base: MarkScore  # triggered prompts without the LoRA
    lora: MarkScore  # triggered prompts with it
    leakage: float  # mean |with - without| over untriggered prompts' pixels, in [0, 1]

    def problems(self) -> list[str]:
        """Why this does not count as learning the mark (empty when it does)."""
        out = []
        if not self.lora.colour_error < min(30.0, self.base.colour_error - 20.0):
            out.append(f"mark colour not learned: error {self.lora.colour_error:.1f} with the LoRA, "
                       f"{self.base.colour_error:.1f} without")
        if not self.lora.iou > self.base.iou + 0.2:
            out.append(f"mark shape not learned: IoU {self.lora.iou:.2f} with the LoRA, {self.base.iou:.2f} without")
        if not self.leakage < 0.12:
            out.append(f"untriggered prompts changed too much: mean pixel change {self.leakage:.3f}")
        return out


def measure(generator, adapter: str, trigger: str, seeds: int = 2, size: int = 64, steps: int = 12,
            scale: float = 1.0) -> Learning:
    """Render triggered and untriggered prompts at LoRA scale 0 and `scale` with one loaded Generator."""
    def render(prompts, at):
        generator.set_scales({adapter: at})
        return [g.image for p in prompts for g in generator.generate(
            p, width=size, height=size, steps=steps, seed=0, num_images=seeds)]

    triggered = [p.format(trigger=trigger) for p in TRIGGERED]
    base, lora = render(triggered, 0.0), render(triggered, scale)
    plain, changed = render(UNTRIGGERED, 0.0), render(UNTRIGGERED, scale)
    leak = np.mean([np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() / 255
                    for a, b in zip(plain, changed)])
    return Learning(MarkScore.of(base), MarkScore.of(lora), float(leak))
