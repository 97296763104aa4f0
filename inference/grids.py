"""Contact-sheet grids of images with optional captions under each tile."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont


def make_grid(images: Sequence[Image.Image], columns: int | None = None, labels: Sequence[str] | None = None,
              tile: int | None = None, row_labels: Sequence[str] | None = None) -> Image.Image:
    """Lay `images` out row by row; every tile is scaled to `tile` px on its long side (default: the largest)."""
    if not images:
        raise ValueError("no images to lay out")
    columns = columns or min(len(images), 4)
    rows = -(-len(images) // columns)
    tile = tile or max(128, max(max(im.size) for im in images))  # small renders are enlarged so labels fit
    font = ImageFont.load_default()
    label_h = 14 if labels else 0
    left = 120 if row_labels else 0
    grid = Image.new("RGB", (left + columns * (tile + 4) + 4, rows * (tile + label_h + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        scale = tile / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
        thumb = image.convert("RGB").resize(size, resample)
        x, y = left + 4 + c * (tile + 4), 4 + r * (tile + label_h + 4)
        grid.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
        if labels:
            draw.text((x, y + tile + 1), labels[i][: max(4, tile // 6)], fill="black", font=font)
    for r, text in enumerate(row_labels or []):
        draw.text((4, 4 + r * (tile + label_h + 4) + tile // 2), text[:18], fill="black", font=font)
    return grid
