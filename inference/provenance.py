"""What a generated PNG says about itself: its parameters and that it is AI-generated.

Each PNG carries a `parameters` JSON text chunk, an `ai_generated` flag, the IPTC digital-source-type
"trainedAlgorithmicMedia" in XMP, and a JSON sidecar with the same record. With the optional
`invisible-watermark` package, an invisible watermark is embedded as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from common.atomic import atomic_path, write_text

SOFTWARE = "flux2-lora"
IPTC_AI = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
WATERMARK = b"flux2ai"

_XMP = f"""<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
 Iptc4xmpExt:DigitalSourceType="{IPTC_AI}"/></rdf:RDF></x:xmpmeta>"""


def watermark(image: Image.Image) -> tuple[Image.Image, bool]:
    try:
        from imwatermark import WatermarkEncoder
    except ImportError:
        return image, False
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", WATERMARK)
    bgr = np.array(image.convert("RGB"))[:, :, ::-1]
    if min(bgr.shape[:2]) < 256:  # the DWT-DCT watermark needs room; tiny images stay unmarked
        return image, False
    return Image.fromarray(encoder.encode(bgr, "dwtDct")[:, :, ::-1]), True


def save_png(image: Image.Image, path: str | Path, record: dict[str, Any]) -> Path:
    path = Path(path)
    image, marked = watermark(image)
    record = {**record, "ai_generated": True, "software": SOFTWARE, "invisible_watermark": marked}
    info = PngInfo()
    info.add_text("parameters", json.dumps(record, sort_keys=True))
    info.add_text("ai_generated", "true")
    info.add_text("Software", SOFTWARE)
    info.add_itxt("XML:com.adobe.xmp", _XMP)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    write_text(path.with_suffix(".json"), json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    with Image.open(path) as im:
        return json.loads(im.text["parameters"])
