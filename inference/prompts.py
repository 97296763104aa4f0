"""Prompt helpers: FLUX.2 follows exact hex colours and JSON-structured prompts well."""

from __future__ import annotations

import json
import re
from typing import Any

from data_tools.errors import UserError

_HEX = re.compile(r"^#?([0-9a-fA-F]{6}|[0-9a-fA-F]{3})$")


def normalise_hex(code: str) -> str:
    """'#e4572e', 'E4572E', '#E52' -> '#E4572E' / '#EE5522'; anything else is a UserError."""
    match = _HEX.match(code.strip())
    if not match:
        raise UserError(f"colour '{code}' is not a hex code; use #RRGGBB (e.g. #E4572E)")
    digits = match.group(1)
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    return "#" + digits.upper()


def hex_to_rgb(code: str) -> tuple[int, int, int]:
    digits = normalise_hex(code)[1:]
    return tuple(int(digits[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]


def hex_prompt(subject: str, colours: dict[str, str]) -> str:
    """'a mug' + {'body': '#E4572E'} -> 'a mug, body in exact colour #E4572E'."""
    parts = [f"{part} in exact colour {normalise_hex(code)}" for part, code in colours.items()]
    return ", ".join([subject, *parts])


def json_prompt(scene: str, *, subjects: list[dict[str, Any]] | None = None, style: str | None = None,
                colour_palette: list[str] | None = None, lighting: str | None = None, camera: dict[str, Any] | None = None,
                text: list[str] | None = None, **extra: Any) -> str:
    """A JSON-structured prompt in the shape FLUX.2's prompting guide uses; hex codes are validated."""
    doc: dict[str, Any] = {"scene": scene}
    if subjects:
        doc["subjects"] = subjects
    if style:
        doc["style"] = style
    if colour_palette:
        doc["color_palette"] = [normalise_hex(c) for c in colour_palette]
    if lighting:
        doc["lighting"] = lighting
    if camera:
        doc["camera"] = camera
    if text:
        doc["text"] = [f'"{t}"' for t in text]
    doc.update(extra)
    return json.dumps(doc, ensure_ascii=False)
