"""A small synthetic captioned set: a brand mark in one exact hex colour, for the quickstart and tests."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from common.atomic import atomic_dir

BRAND_HEX = "#E4572E"
BACKGROUNDS = [("light gray", "#D9D9D9"), ("white", "#FFFFFF"), ("navy blue", "#1B2A49"), ("mint green", "#B8E0C8"),
               ("black", "#111111"), ("sand beige", "#E8D8B0")]
SIZES = [(256, 256), (320, 240), (240, 320)]


def _mark(draw: ImageDraw.ImageDraw, cx: int, cy: int, r: int, colour: str, background: str) -> None:
    """A ring with a bar through it: simple, but with structure a LoRA can learn."""
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    inner = int(r * 0.55)
    draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=background)
    draw.rectangle((cx - r, cy - r // 7, cx + r, cy + r // 7), fill=colour)


def write_sample_data(out_dir: str | Path, count: int = 12, trigger: str = "zxq", seed: int = 0) -> Path:
    rng = random.Random(seed)
    with atomic_dir(out_dir) as tmp:
        for i in range(count):
            width, height = SIZES[i % len(SIZES)]
            bg_name, bg_hex = BACKGROUNDS[i % len(BACKGROUNDS)]
            image = Image.new("RGB", (width, height), bg_hex)
            r = rng.randint(min(width, height) // 5, min(width, height) // 3)
            cx, cy = rng.randint(r, width - r), rng.randint(r, height - r)
            _mark(ImageDraw.Draw(image), cx, cy, r, BRAND_HEX, bg_hex)
            name = f"mark_{i:02d}"
            image.save(tmp / f"{name}.png")
            where = "centred" if abs(cx - width / 2) < width / 8 else ("on the left" if cx < width / 2 else "on the right")
            caption = f"{trigger} logo, a {BRAND_HEX} ring mark with a bar, {where}, on a {bg_name} background"
            (tmp / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    return Path(out_dir)
