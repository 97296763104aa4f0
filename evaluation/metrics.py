"""Evaluation metrics, each a pure function of images (and, where named, an encoder). Formulas and directions:

- colour_delta_e(image, hex) -> CIEDE2000 between the requested colour and the closest of the image's 8 dominant
  colours (median-cut quantisation). Lower is better; < 2 is hard to see, > 10 is a different colour.
- ImageEncoder.similarity(images, references) -> mean cosine similarity of image embeddings to each reference.
  Higher is better; identical images give 1.
- leakage(base, adapted) -> 1 - SSIM between the base model's and the adapter's image for the same prompt and
  seed (grayscale). 0 means the adapter changed nothing; higher means it leaks into prompts it should not touch.
- diversity(images) -> mean pairwise 1 - SSIM across seeds of one prompt. Higher means more varied.
- text_error(image, expected) -> character error rate of OCR'd text against the expected string (0 is perfect),
  or None when no OCR package is installed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from common.images import hex_to_rgb
from common.local_models import load_local

NOTICEABLE_DELTA_E = 2.0  # CIEDE2000: below about 2 most people see no difference
# The most an adapter may change a prompt without its trigger (1 - SSIM) and still be recommended: above it, the
# subject shows up where nobody asked for it.
LEAKAGE_LIMIT = 0.25

METRICS = ("reference_similarity", "colour_delta_e", "leakage", "diversity", "text_error")
DIRECTION = {
    "reference_similarity": "higher is better",
    "colour_delta_e": "lower is better",
    "leakage": "lower is better",
    "diversity": "higher is more varied",
    "text_error": "lower is better",
}


def dominant_colours(image: Image.Image, count: int = 8) -> list[tuple[int, int, int]]:
    small = image.convert("RGB").copy()
    small.thumbnail((128, 128))
    palette = small.quantize(colors=count, method=Image.Quantize.MEDIANCUT).getpalette()[
        : count * 3
    ]
    return [tuple(palette[i : i + 3]) for i in range(0, len(palette), 3)]


def colour_delta_e(image: Image.Image, hex_code: str) -> float:
    from skimage.color import deltaE_ciede2000, rgb2lab

    target = rgb2lab(np.array([[hex_to_rgb(hex_code)]], dtype=np.float64) / 255.0)
    colours = rgb2lab(np.array([dominant_colours(image)], dtype=np.float64) / 255.0)
    return float(deltaE_ciede2000(np.repeat(target, colours.shape[1], axis=1), colours).min())


def _gray(image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    g = image.convert("L")
    if size and g.size != size:
        g = g.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(g, dtype=np.float64) / 255.0


def dissimilarity(a: Image.Image, b: Image.Image) -> float:
    """1 - SSIM on grayscale (b resized to a's size if needed); 0 for identical images."""
    from skimage.metrics import structural_similarity

    x = _gray(a)
    y = _gray(b, (a.width, a.height))
    win = min(7, *(s - (1 - s % 2) for s in x.shape))  # odd window no larger than the image
    return float(max(0.0, 1.0 - structural_similarity(x, y, data_range=1.0, win_size=max(3, win))))


def leakage(base: Image.Image, adapted: Image.Image) -> float:
    return dissimilarity(base, adapted)


def diversity(images: Sequence[Image.Image]) -> float | None:
    pairs = list(itertools.combinations(images, 2))
    if not pairs:
        return None
    return float(np.mean([dissimilarity(a, b) for a, b in pairs]))


class ImageEncoder:
    """Any transformers vision model from a local folder (CLIP, SigLIP, DINOv2, ...): image -> unit vector."""

    def __init__(self, path: str | Path):
        import torch
        from transformers import AutoImageProcessor, AutoModel

        folder = Path(path)
        self.processor, self.model = load_local(
            folder,
            folder,
            AutoModel,
            AutoImageProcessor,
            "--encoder",
            "an image model (CLIP, SigLIP, DINOv2)",
        )
        self.torch = torch
        self.name = folder.name

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        torch = self.torch
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        with torch.no_grad():
            if hasattr(self.model, "get_image_features"):
                feats = self.model.get_image_features(**inputs)
                feats = getattr(feats, "pooler_output", feats)
            else:
                out = self.model(**inputs)
                feats = (
                    out.pooler_output
                    if getattr(out, "pooler_output", None) is not None
                    else out.last_hidden_state.mean(1)
                )
        feats = feats.double()
        return (feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)).numpy()

    def similarity(self, images: Sequence[Image.Image], reference_embeddings: np.ndarray) -> float:
        return float((self.embed(images) @ reference_embeddings.T).mean())


def ocr_available() -> bool:
    try:
        import rapidfuzz  # noqa: F401
        import rapidocr_onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


_OCR = None


def text_error(image: Image.Image, expected: str) -> float | None:
    """Character error rate (edit distance / length) of the best OCR line against `expected`; None without OCR."""
    global _OCR
    if not ocr_available():
        return None
    from rapidfuzz.distance import Levenshtein
    from rapidocr_onnxruntime import RapidOCR

    _OCR = _OCR or RapidOCR()
    result, _ = _OCR(np.asarray(image.convert("RGB")))
    lines = [r[1] for r in (result or [])]
    text = " ".join(lines).strip()
    if not expected:
        return 0.0
    return min(1.0, Levenshtein.distance(text.upper(), expected.upper()) / len(expected))
