"""A small synthetic captioned set: a brand mark in one exact hex colour, for the quickstart and tests.

The mark (common/synthetic.py: a #E4572E ring with a bar) is drawn on backgrounds the pretrained tiny model
knows by name, and captioned in the world's words plus the trigger ("zxq logo on a navy blue background"):
the base model draws the background from the words, and only a LoRA can add the mark.
"""

from __future__ import annotations

import random
from pathlib import Path

from common.atomic import atomic_dir
from common.synthetic import mark_scene

BACKGROUNDS = ["light gray", "white", "navy blue", "mint green", "black", "sand beige"]
SIZES = [(256, 256), (320, 240), (240, 320)]


def caption(trigger: str, background: str) -> str:
    return f"{trigger} logo on a {background} background"


def write_sample_data(
    out_dir: str | Path, count: int = 12, trigger: str = "zxq", seed: int = 0
) -> Path:
    rng = random.Random(seed)
    with atomic_dir(out_dir) as tmp:
        for i in range(count):
            width, height = SIZES[i % len(SIZES)]
            background = BACKGROUNDS[i % len(BACKGROUNDS)]
            # a product-shot framing: the mark near the middle at about the same size, as a brand kit shows it
            side = min(width, height)
            r = rng.uniform(0.26, 0.33) * side
            cx, cy = (
                width / 2 + rng.uniform(-0.1, 0.1) * side,
                height / 2 + rng.uniform(-0.1, 0.1) * side,
            )
            image, _ = mark_scene(width, height, background, cx, cy, r)
            name = f"mark_{i:02d}"
            image.save(tmp / f"{name}.png")
            (tmp / f"{name}.txt").write_text(caption(trigger, background) + "\n", encoding="utf-8")
    return Path(out_dir)
