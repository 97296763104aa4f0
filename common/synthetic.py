"""A synthetic world of flat shapes in named colours, with captions in words the tiny tokenizer knows.

The tiny FLUX.2 is pretrained on it (scripts/pretrain_tiny.py), the quickstart's brand set is drawn in it
(data_tools/sample_data.py) and the learning tests measure generated images against it. One home for its
vocabulary, so the base model knows every background the brand set is captioned with.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

# Named colours the base model learns. Background names of the brand set come from this table.
COLOURS: dict[str, str] = {
    "red": "#D62828",
    "orange": "#F77F00",
    "yellow": "#FCBF49",
    "green": "#2A9D43",
    "blue": "#1F6FEB",
    "purple": "#7B2CBF",
    "pink": "#F4A6C6",
    "white": "#FFFFFF",
    "black": "#111111",
    "gray": "#8A8A8A",
    "light gray": "#D9D9D9",
    "navy blue": "#1B2A49",
    "mint green": "#B8E0C8",
    "sand beige": "#E8D8B0",
    "teal": "#138A8A",
    "brown": "#7A4A22",
}
SHAPES = ("circle", "square", "triangle", "ring", "bar", "cross")

# The quickstart's brand mark: a ring with a bar through it in one exact colour. Neither the shape nor the
# colour is a word of the world, so the base model cannot draw it from the words alone.
MARK_HEX = "#E4572E"
MARK_SHAPE = "ring with a bar"


def hex_rgb(code: str) -> tuple[int, int, int]:
    code = code.lstrip("#")
    return int(code[0:2], 16), int(code[2:4], 16), int(code[4:6], 16)


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    colour: str,
    background: str,
) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, fill=colour)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=background)
    elif shape == "bar":
        draw.rectangle((cx - r, cy - r * 0.28, cx + r, cy + r * 0.28), fill=colour)
    elif shape == "cross":
        t = r * 0.3
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=colour)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=colour)
    elif shape == MARK_SHAPE:
        draw_shape(draw, "ring", cx, cy, r, colour, background)
        draw.rectangle((cx - r, cy - r / 7, cx + r, cy + r / 7), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def scene(
    width: int,
    height: int,
    shape: str,
    colour: str,
    background: str,
    cx: float,
    cy: float,
    r: float,
) -> tuple[Image.Image, np.ndarray]:
    """One shape on a flat background -> (image, boolean mask of the shape's pixels)."""
    image = Image.new("RGB", (width, height), background)
    draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, colour, background)
    mask = Image.new("L", (width, height), 0)
    draw_shape(ImageDraw.Draw(mask), shape, cx, cy, r, 255, 0)
    return image, np.asarray(mask) > 127


def random_scene(rng: random.Random, width: int, height: int) -> tuple[Image.Image, str]:
    """A random shape, colour, background and placement, with its caption ("a red ring on a navy blue background")."""
    shape = rng.choice(SHAPES)
    colour, background = rng.sample(list(COLOURS), 2)
    side = min(width, height)
    r = rng.uniform(0.2, 0.38) * side
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    image, _ = scene(width, height, shape, COLOURS[colour], COLOURS[background], cx, cy, r)
    return image, f"a {colour} {shape} on a {background} background"


def mark_scene(width: int, height: int, background: str, cx: float, cy: float, r: float):
    """The brand mark on a named background -> (image, mask)."""
    return scene(width, height, MARK_SHAPE, MARK_HEX, COLOURS[background], cx, cy, r)


def vocabulary() -> str:
    """Every word a caption of this world can use, for the tiny tokenizer's corpus."""
    return " ".join([*COLOURS, *SHAPES, MARK_SHAPE, "a on background logo mark"])


def mark_match(image: Image.Image, tolerance: float = 35.0) -> dict[str, float]:
    """How much of the brand mark an image shows, without knowing where it was drawn.

    coverage: share of pixels within `tolerance` (RGB distance) of the mark's colour; iou: overlap of those
    pixels with the ideal mark fitted to their bounding box (1 = a perfect ring with a bar, 0 = none there);
    colour_error: RGB distance from the mark's colour to the mean of the closest pixels (the best 2 %)."""
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    dist = np.sqrt(((px - np.array(hex_rgb(MARK_HEX), dtype=np.float32)) ** 2).sum(-1))
    near = dist < tolerance
    best = np.sort(dist.ravel())[: max(1, dist.size // 50)]
    result = {"coverage": float(near.mean()), "iou": 0.0, "colour_error": float(best.mean())}
    ys, xs = np.nonzero(near)
    if len(xs) >= 8:
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        r = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) / 2
        _, ideal = scene(image.width, image.height, MARK_SHAPE, "#000000", "#FFFFFF", cx, cy, r)
        result["iou"] = float((near & ideal).sum() / (near | ideal).sum())
    return result


def colour_counts(pixels) -> dict[str, int]:
    """How many pixels are nearest to each named colour (RGB distance), for the colours present, most first (the
    first is the image's background); `pixels`: an array (..., 3) in 0-255."""
    names = list(COLOURS)
    table = np.array([hex_rgb(COLOURS[n]) for n in names], dtype=np.float32)
    px = np.asarray(pixels, dtype=np.float32).reshape(-1, 3)
    nearest = np.argmin(((px[:, None, :] - table[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(names))
    return {names[i]: int(counts[i]) for i in np.argsort(-counts, kind="stable") if counts[i]}
