"""Per-image and per-dataset checks. Every finding is a `Problem`: file, severity, what, and the fix.

Severity: "error" = the image cannot be used (it is left out); "warning" = it will train, but probably not
as the user wants; "info" = handled automatically (with --fix) or worth knowing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import warnings

import imagehash
from PIL import Image, ImageOps, UnidentifiedImageError

from common.images import exif_orientation, upright_size
from common.metadata import decode_text
from common.trigger import count_trigger

MIN_IMAGES, MAX_IMAGES = 9, 50
MAX_ASPECT = 4.0
# perceptual-hash distance (of 64 bits) at or below which two images look the same
NEAR_DUPLICATE_BITS = 6
TOKEN_WINDOW = 512


@dataclasses.dataclass(frozen=True)
class Problem:
    file: str
    severity: str
    code: str
    message: str
    fix: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ImageFacts:
    name: str
    usable: bool
    width: int = 0  # after EXIF orientation
    height: int = 0
    mode: str = ""
    format: str = ""
    sha256: str = ""
    phash: str = ""
    # 4x4 RGB thumbnail, hex: perceptual hashes ignore colour, so flat images all look alike
    colour: str = ""
    problems: list[Problem] = dataclasses.field(default_factory=list)


def inspect_image(name: str, data: bytes, resolution: int, max_pixels: int) -> ImageFacts:
    facts = ImageFacts(name=name, usable=False, sha256=hashlib.sha256(data).hexdigest())

    def problem(severity, code, message, fix):
        facts.problems.append(Problem(name, severity, code, message, fix))

    if not data:
        problem("error", "zero_bytes", "the file is empty (0 bytes)", "re-export or re-download it")
        return facts
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > max_pixels:
                problem(
                    "error",
                    "decompression_bomb",
                    f"{im.width}x{im.height} is over {max_pixels:,} pixels",
                    "downscale it, or raise --max-pixels if you trust the file",
                )
                return facts
            facts.format, facts.mode = im.format or "", im.mode
            orientation = exif_orientation(im)
            width, height = upright_size(im)
            im.load()  # full decode: catches truncated and corrupt files
    except UnidentifiedImageError:
        problem(
            "error",
            "not_an_image",
            "not an image file (or a format Pillow cannot read)",
            "remove it or convert it to PNG/JPEG",
        )
        return facts
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        problem(
            "error",
            "corrupt",
            f"cannot be decoded ({str(exc)[:80]})",
            "re-export it from the original",
        )
        return facts

    facts.usable = True
    facts.width, facts.height = width, height
    if orientation != 1:
        problem(
            "info",
            "exif_orientation",
            f"EXIF orientation {orientation}: shown rotated/flipped",
            "applied automatically when training; --fix writes it upright",
        )
    mode_notes = {
        "CMYK": (
            "warning",
            "cmyk",
            "CMYK colour (print export): colours shift when converted",
            "export as sRGB; --fix converts",
        ),
        "I;16": ("info", "16_bit", "16-bit image", "--fix converts to 8-bit RGB"),
        "I": ("info", "16_bit", "16/32-bit integer image", "--fix converts to 8-bit RGB"),
        "P": ("info", "palette", "palette image", "--fix converts to RGB"),
        "L": (
            "info",
            "grayscale",
            "grayscale image: the LoRA may learn to drop colour",
            "use colour images unless that is the style",
        ),
        "LA": (
            "info",
            "alpha",
            "grayscale with transparency",
            "--fix composites it on --background",
        ),
        "RGBA": (
            "info",
            "alpha",
            "has transparency: training sees it composited on --background",
            "--fix composites it",
        ),
        "1": ("info", "bilevel", "1-bit image", "--fix converts to RGB"),
    }
    if im.mode in mode_notes:
        problem(*mode_notes[im.mode])
    elif im.mode == "P" or "transparency" in im.info:
        problem("info", "alpha", "has transparency", "--fix composites it on --background")
    if min(width, height) < resolution * 0.75 and width * height < resolution * resolution * 0.6:
        problem(
            "warning",
            "small",
            f"{width}x{height} is below the {resolution}px training size and would be upscaled",
            "use a larger original, or train at a lower resolution",
        )
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > MAX_ASPECT:
        problem(
            "warning",
            "extreme_aspect",
            f"aspect ratio {ratio:.1f}:1; the crop to a {MAX_ASPECT:g}:1 bucket loses a lot",
            "crop it by hand to the part that matters",
        )

    thumb = ImageOps.exif_transpose(im).convert("RGB")
    thumb.thumbnail((256, 256))
    facts.phash = str(imagehash.phash(thumb))
    facts.colour = thumb.resize((4, 4), Image.Resampling.BOX).tobytes().hex()
    return facts


def phash_distance(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def look_alike(a: ImageFacts, b: ImageFacts) -> bool:
    """Near duplicates: the same structure (perceptual hash) and the same colours (mean error < 6%)."""
    if phash_distance(a.phash, b.phash) > NEAR_DUPLICATE_BITS:
        return False
    ca, cb = bytes.fromhex(a.colour), bytes.fromhex(b.colour)
    return sum(abs(x - y) for x, y in zip(ca, cb)) / max(1, len(ca)) < 0.06 * 255


def approx_tokens(text: str) -> int:
    """A conservative token estimate (byte-level BPE averages 3-4 bytes a token for English)."""
    return math.ceil(len(text.encode("utf-8")) / 3)


def caption_problems(
    name: str, raw: bytes | None, origin: str, trigger: str | None
) -> tuple[str | None, list[Problem]]:
    """Decode and check one caption. Returns (text or None, problems)."""
    problems = []
    if raw is None:
        return None, [
            Problem(
                name,
                "warning",
                "caption_missing",
                "no caption (sidecar, metadata or dataset column)",
                "write one, or let --captioner fill it in",
            )
        ]
    try:
        text = decode_text(raw)
    except UnicodeDecodeError as exc:
        return None, [
            Problem(
                name,
                "error",
                "caption_not_utf8",
                f"{origin} caption is not UTF-8 (byte {exc.start})",
                "re-save the caption as UTF-8; the captioner is used meanwhile",
            )
        ]
    text = text.strip()
    if not text:
        return None, [
            Problem(
                name,
                "warning",
                "caption_empty",
                "the caption is empty",
                "write one, or let --captioner fill it in",
            )
        ]
    if approx_tokens(text) > TOKEN_WINDOW - 64:
        problems.append(
            Problem(
                name,
                "warning",
                "caption_too_long",
                f"about {approx_tokens(text)} tokens; the text "
                f"encoder reads {TOKEN_WINDOW} including its template, the rest is cut",
                "shorten it",
            )
        )
    if trigger:
        count = count_trigger(text, trigger)
        if count == 0:
            problems.append(
                Problem(
                    name,
                    "warning",
                    "trigger_missing",
                    f"trigger word '{trigger}' is not in the caption",
                    "--fix prepends it (training adds it too)",
                )
            )
        elif count > 1:
            problems.append(
                Problem(
                    name,
                    "warning",
                    "trigger_repeated",
                    f"trigger word '{trigger}' appears {count} times",
                    "--fix keeps one",
                )
            )
    return text, problems


def dataset_problems(facts: list[ImageFacts], buckets: dict[str, tuple[int, int]]) -> list[Problem]:
    usable = [f for f in facts if f.usable]
    problems = []
    n = len(usable)
    if n < MIN_IMAGES or n > MAX_IMAGES:
        advice = (
            "add images: 9-50 varied images train best"
            if n < MIN_IMAGES
            else "more than 50 images rarely helps a LoRA; pick the best 50 or train longer"
        )
        problems.append(
            Problem(
                "(dataset)",
                "info",
                "image_count",
                f"{n} usable images (guidance: {MIN_IMAGES}-{MAX_IMAGES})",
                advice,
            )
        )
    sizes = {(f.width, f.height) for f in usable}
    if n >= 4 and len(sizes) == 1:
        w, h = sizes.pop()
        problems.append(
            Problem(
                "(dataset)",
                "info",
                "uniform_size",
                f"all images are {w}x{h} (one source or device?)",
                "fine for one framing; mix crops and distances for a more flexible LoRA",
            )
        )
    distinct = len(set(buckets.values()))
    if n and distinct > max(3, n // 3):
        problems.append(
            Problem(
                "(dataset)",
                "warning",
                "varied_size",
                f"{distinct} aspect buckets for {n} images: batches will be small and uneven",
                "crop to a few aspect ratios, or use --batch-size to merge",
            )
        )
    return problems
