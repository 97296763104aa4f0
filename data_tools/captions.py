"""Caption helpers and captioners.

Captioners fill in missing captions: `template` ("{trigger} {class_word}") needs nothing; `vlm:PATH` runs any
local image-to-text model through transformers (a model folder, or a FLUX.2 [dev] pipeline folder whose
Mistral-3 text encoder is a vision-language model).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Protocol

from PIL import Image

from common.errors import UserError
from common.local_models import load_local
from common.trigger import count_trigger, with_trigger

PROMPT = "Describe this image in one short sentence for an image-generation caption."


def normalise(text: str, trigger: str | None = None) -> str:
    """Strip and collapse whitespace; then the trigger rule (common/trigger.py): exactly once."""
    return with_trigger(re.sub(r"\s+", " ", text).strip(), trigger)


def replace_class_word(text: str, class_word: str, replacement: str) -> str:
    """'a man in a hat', 'man', 'ohwx man' -> 'a ohwx man in a hat' (whole words only)."""
    return re.sub(rf"(?<!\w){re.escape(class_word)}(?!\w)", replacement, text)


def dedupe_tags(text: str) -> str:
    """Comma-separated tags: drop repeats (case-insensitive), keep first order."""
    seen, out = set(), []
    for tag in (t.strip() for t in text.split(",")):
        if tag and tag.lower() not in seen:
            seen.add(tag.lower())
            out.append(tag)
    return ", ".join(out)


def caption_variants(
    caption: str,
    trigger: str | None,
    *,
    shuffle: bool,
    keep: int,
    dropout: float,
    count: int,
    seed: int,
) -> tuple[str, ...]:
    """The caption itself, then `count - 1` variants with its comma-separated tags shuffled (the first `keep`
    stay in place) and each later tag dropped with probability `dropout`; the trigger's tag is never moved or
    dropped. Deterministic in `seed`. Embeddings are cached, so variants are made up front, not per step."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    if count <= 1 or len(tags) <= keep + (0 if shuffle else -1) or not (shuffle or dropout):
        return (caption,)
    pinned = [i for i, t in enumerate(tags) if i < keep or (trigger and count_trigger(t, trigger))]
    rng = random.Random(seed)
    variants = [caption]
    for _ in range(count - 1):
        loose = [t for i, t in enumerate(tags) if i not in pinned]
        if shuffle:
            rng.shuffle(loose)
        loose = [t for t in loose if rng.random() >= dropout]
        it = iter(loose)
        variant = [tags[i] if i in pinned else next(it, None) for i in range(len(tags))]
        variants.append(", ".join(t for t in variant if t))
    return tuple(dict.fromkeys(variants))


class Captioner(Protocol):
    name: str

    def caption(self, image: Image.Image) -> str: ...


class TemplateCaptioner:
    name = "template"

    def __init__(self, trigger: str | None, class_word: str | None):
        self.text = " ".join(w for w in (trigger, class_word) if w) or "a photo"

    def caption(self, image: Image.Image) -> str:
        return self.text


class VLMCaptioner:
    """Any local transformers image-text-to-text model; generation is greedy so captions are reproducible."""

    def __init__(self, path: str, max_new_tokens: int = 40):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = Path(path)
        # a diffusers pipeline: use its text encoder + processor
        if (folder / "model_index.json").is_file():
            model_dir, processor_dir = folder / "text_encoder", folder / "tokenizer"
        else:
            model_dir = processor_dir = folder
        self.processor, self.model = load_local(
            model_dir,
            processor_dir,
            AutoModelForImageTextToText,
            AutoProcessor,
            "--captioner vlm:",
            "an image-to-text model",
        )
        self.torch = torch
        self.name = f"vlm:{path}"
        self.max_new_tokens = max_new_tokens

    def caption(self, image: Image.Image) -> str:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}
        ]
        prompt = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        inputs = self.processor(text=prompt, images=[image.convert("RGB")], return_tensors="pt")
        with self.torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        text = self.processor.batch_decode(
            out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )[0]
        text = "".join(ch for ch in text if ch.isprintable())  # random/tiny models emit stray bytes
        return re.sub(r"\s+", " ", text).strip() or "an image"


def make_captioner(spec: str, trigger: str | None, class_word: str | None) -> Captioner:
    if spec == "template":
        return TemplateCaptioner(trigger, class_word)
    if spec.startswith("vlm:"):
        return VLMCaptioner(spec[4:])
    raise UserError(
        f"--captioner '{spec}' is unknown; use template or vlm:PATH (a local image-to-text model)"
    )
