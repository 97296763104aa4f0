"""Reading user images safely (EXIF orientation applied, RGB out, alpha composited, size capped) and hex colours."""

from __future__ import annotations

import io
import re
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import UserError
from common.limits import MAX_PIXELS

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_HEX = re.compile(r"^#?([0-9a-fA-F]{6}|[0-9a-fA-F]{3})$")


def open_rgb(path: str | Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(
            f"image '{path}' cannot be read ({exc.strerror}); fix or remove it"
        ) from None
    return decode_rgb(data, str(path), background)


def decode_rgb(
    data: bytes, name: str, background: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """Decode image bytes upright (EXIF applied) as RGB, compositing any transparency on `background`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise UserError(
                    f"image '{name}' is {im.width}x{im.height}, over {MAX_PIXELS:,} pixels; downscale it"
                )
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                flat = Image.new("RGB", rgba.size, background)
                flat.paste(rgba, mask=rgba.getchannel("A"))
                return flat
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit -> 8-bit before RGB, not clipped to white
                im = im.point(lambda v: v / 256).convert("L")
            return im.convert("RGB")
    except UserError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as exc:
        raise UserError(
            f"image '{name}' cannot be read ({type(exc).__name__}: {str(exc)[:120]}); fix or remove it"
        ) from None


def check_image(path: str | Path) -> tuple[int, int]:
    """Upright (width, height) of an image file, after checking the whole file decodes (truncated and corrupt files
    fail here, not minutes later). Cheap: JPEGs decode at 1/8 scale, PNGs are checked chunk by chunk."""
    try:
        with Image.open(path) as im:
            size = upright_size(im)
            if im.width * im.height > MAX_PIXELS:
                raise UserError(
                    f"image '{path}' is {im.width}x{im.height}, over {MAX_PIXELS:,} pixels; downscale it"
                )
        with Image.open(path) as im:  # afresh: PNG's verify() must come straight after open
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
            elif im.format == "PNG":
                im.verify()
            else:
                im.load()
    except UserError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as exc:
        raise UserError(
            f"image '{path}' cannot be read ({type(exc).__name__}: {str(exc)[:80]}); fix or remove it"
        ) from None
    return size


def exif_orientation(im: Image.Image) -> int:
    exif = im.getexif()
    return exif.get(0x0112, 1) if exif else 1


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as shown, i.e. after its EXIF orientation."""
    return (im.height, im.width) if exif_orientation(im) in _ROTATED else (im.width, im.height)


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover (width, height) keeping aspect, then centre-crop to exactly that size."""
    scale = max(width / image.width, height / image.height)
    new = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(new, Image.Resampling.LANCZOS) if new != image.size else image
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def normalise_hex(code: str, what: str = "colour") -> str:
    """'#e4572e', 'E4572E', '#E52' -> '#E4572E' / '#EE5522'; anything else is a UserError naming `what`."""
    match = _HEX.match(code.strip())
    if not match:
        raise UserError(f"{what} '{code}' is not a hex code; use #RRGGBB (e.g. #E4572E)")
    digits = match.group(1)
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    return "#" + digits.upper()


def hex_to_rgb(code: str, what: str = "colour") -> tuple[int, int, int]:
    digits = normalise_hex(code, what)[1:]
    return tuple(int(digits[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
