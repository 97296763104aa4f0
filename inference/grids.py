"""Contact sheets people can read: images at a common height (tiny renders enlarged pixel for pixel), wrapped
labels under each, optional row labels and a title.

Two layouts: `columns` given -> a matrix (rows x columns, every cell the same box: checkpoints x scales, before /
after); otherwise the images flow into rows by their own aspect ratio, wrapping at `max_width`.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 15
LINE = FONT_SIZE + 4
PAD = 8
MAX_ASPECT = 3.0  # wider images are scaled down to 3x the row height instead of stretching the row
MAX_LABEL_LINES = 4


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def wrap(text: str, font, width: int, max_lines: int = MAX_LABEL_LINES) -> list[str]:
    """Word-wrap `text` (explicit newlines kept) to `width` pixels; the last line ends in an ellipsis if cut."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}".strip()
            if measure(candidate, font=font) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and measure(lines[-1] + "…", font=font) > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "…"
    return lines


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    scale = min(width / image.width, height / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # enlarging a 64 px render: nearest neighbour shows its real pixels instead of a blur
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return image.convert("RGB").resize(size, resample)


def make_grid(
    images: Sequence[Image.Image],
    columns: int | None = None,
    labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    height: int = 256,
    max_width: int = 1800,
) -> Image.Image:
    if not images:
        raise ValueError("no images to lay out")
    font = _font()
    if columns:
        aspect = min(MAX_ASPECT, max(im.width / im.height for im in images))
        cell = (round(height * aspect), height)
        boxes = [cell] * len(images)
        rows = [
            list(range(i, min(i + columns, len(images)))) for i in range(0, len(images), columns)
        ]
    else:
        boxes = [(round(height * min(MAX_ASPECT, im.width / im.height)), height) for im in images]
        rows, current, used = [], [], 0
        for i, (w, _) in enumerate(boxes):
            if current and used + w + PAD > max_width:
                rows.append(current)
                current, used = [], 0
            current.append(i)
            used += w + PAD
        rows.append(current)
    texts = [wrap(labels[i], font, boxes[i][0]) if labels else [] for i in range(len(images))]
    left = 180 if row_labels else 0
    top = LINE + PAD if title else 0
    row_heights = [
        height + LINE * max((len(texts[i]) for i in row), default=0) + PAD for row in rows
    ]
    width = left + max(sum(boxes[i][0] + PAD for i in row) for row in rows) + PAD
    sheet = Image.new("RGB", (width, top + sum(row_heights) + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PAD, PAD // 2), title, fill="black", font=_font(FONT_SIZE + 2))
    y = top + PAD
    for r, row in enumerate(rows):
        if row_labels and r < len(row_labels):
            for k, line in enumerate(wrap(row_labels[r], font, left - 2 * PAD)):
                draw.text((PAD, y + height // 2 - LINE + k * LINE), line, fill="black", font=font)
        x = left + PAD
        for i in row:
            tile = _fit(images[i], *boxes[i])
            sheet.paste(
                tile, (x + (boxes[i][0] - tile.width) // 2, y + (height - tile.height) // 2)
            )
            for k, line in enumerate(texts[i]):
                draw.text((x, y + height + 2 + k * LINE), line, fill="black", font=font)
            x += boxes[i][0] + PAD
        y += row_heights[r]
    return sheet
