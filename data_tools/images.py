"""Reading user images safely: EXIF orientation applied, RGB out, alpha composited, size capped."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from data_tools.errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MAX_PIXELS = 64_000_000  # refuse decompression bombs well before they exhaust memory


def open_rgb(path: str | Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"image '{path}' cannot be read ({exc.strerror}); fix or remove it") from None
    return decode_rgb(data, str(path), background)


def decode_rgb(data: bytes, name: str, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode image bytes upright (EXIF applied) as RGB, compositing any transparency on `background`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise UserError(f"image '{name}' is {im.width}x{im.height}, over {MAX_PIXELS:,} pixels; downscale it")
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                flat = Image.new("RGB", rgba.size, background)
                flat.paste(rgba, mask=rgba.getchannel("A"))
                return flat
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256).convert("L")  # 16-bit -> 8-bit before RGB, not clipped to white
            return im.convert("RGB")
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"image '{name}' cannot be read ({type(exc).__name__}: {str(exc)[:120]}); fix or remove it") from None


def oriented_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"image '{path}' cannot be read ({type(exc).__name__}); fix or remove it") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover (width, height) keeping aspect, then centre-crop to exactly that size."""
    scale = max(width / image.width, height / image.height)
    new = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(new, Image.Resampling.LANCZOS) if new != image.size else image
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))
