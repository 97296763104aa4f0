"""Prompt helpers: FLUX.2 follows exact hex colours and JSON-structured prompts well."""

from __future__ import annotations

import json
from typing import Any

from common.images import normalise_hex


def hex_prompt(subject: str, colours: dict[str, str]) -> str:
    """'a mug' + {'body': '#E4572E'} -> 'a mug, body in exact colour #E4572E'."""
    parts = [f"{part} in exact colour {normalise_hex(code)}" for part, code in colours.items()]
    return ", ".join([subject, *parts])


def json_prompt(
    scene: str,
    *,
    subjects: list[dict[str, Any]] | None = None,
    style: str | None = None,
    colour_palette: list[str] | None = None,
    lighting: str | None = None,
    camera: dict[str, Any] | None = None,
    text: list[str] | None = None,
    **extra: Any,
) -> str:
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
