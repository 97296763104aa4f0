"""Latents and prompt embeddings, computed once and kept on disk as safetensors.

Keys are content hashes: sha256 of the image file + bucket size + VAE identity for latents; sha256 of
the caption + text-encoder identity for embeddings. Editing an image or a caption, or changing the model,
misses the cache; nothing else does, so reruns (and other runs on the same data) skip the encoders.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from common.atomic import atomic_path
from common.configtree import option
from common.errors import UserError
from common.images import fit, open_rgb
from common.limits import SIDE_MULTIPLE
from data_tools.dataset import Sample
from inference.conditioning import Encoder
from inference.loading import BaseModel, ModelConfig, load_pipeline


def _default_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flux2-lora")


@dataclasses.dataclass
class CacheConfig:
    dir: str = option(
        factory=_default_cache_dir,
        help="where cached latents and embeddings live",
        shown_default="$XDG_CACHE_HOME/flux2-lora or ~/.cache/flux2-lora",
    )
    device: Literal["auto", "cpu"] = option(
        "auto",
        help="where the encoders run: the training device, or cpu "
        "when the text encoder does not fit on the GPU",
    )


@dataclasses.dataclass
class Features:
    """Everything the training loop reads, in memory: one latent per sample, one embedding per caption."""

    latents: list[torch.Tensor]  # per sample: (1, 128, h, w), normalised as the pipeline does
    references: list[list[torch.Tensor]]  # per sample, per reference image: (1, 128, h_i, w_i)
    embeds: dict[str, torch.Tensor]  # caption -> (1, L, D); "" is the caption-dropout embedding
    # per sample (1, h*w) in [0, 1], or empty
    masks: list[torch.Tensor] = dataclasses.field(default_factory=list)
    text_encoder_calls: int = 0
    vae_calls: int = 0


# Bump when image reading/resizing or embedding layout changes: old entries then simply miss.
CACHE_FORMAT = "v1"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _save(path: Path, tensor: torch.Tensor) -> None:
    with atomic_path(path) as tmp:
        save_file({"value": tensor.contiguous().cpu()}, str(tmp))


def _load(path: Path) -> torch.Tensor:
    return load_file(str(path))["value"]


def _encode_reference(encoder: Encoder, path: Path) -> torch.Tensor:
    try:
        return encoder.encode_reference(open_rgb(path))
    # the pipeline's own reference checks: too small, too extreme an aspect ratio
    except ValueError as exc:
        raise UserError(f"reference image '{path}': {str(exc).splitlines()[0]}") from None


def token_mask(sample: Sample) -> torch.Tensor:
    """A sample's mask on its latent token grid: cropped to the bucket exactly as the image, then averaged over each
    16x16-pixel patch (one token) -> (1, h*w) in [0, 1]. Cheap, so not cached."""
    width, height = sample.bucket
    image = fit(open_rgb(sample.mask).convert("L"), width, height)
    grid = image.resize((width // SIDE_MULTIPLE, height // SIDE_MULTIPLE), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(grid, dtype=np.float32).copy()).view(1, -1) / 255.0


def build_features(
    samples: list[Sample],
    base: BaseModel,
    model: ModelConfig,
    cfg: CacheConfig,
    show_progress: bool = True,
    device: torch.device | str = "cpu",
    extra_prompts: tuple[str, ...] = (),
) -> Features:
    """Encode what is not cached yet (captions, "", and `extra_prompts` such as sample prompts), then load all.
    The encoders load only when something is missing, and are freed before this returns."""
    device = torch.device("cpu" if cfg.device == "cpu" else device)
    dtype = model.dtype
    root = Path(cfg.dir).expanduser()
    latent_dir = root / CACHE_FORMAT / "latents" / base.identity("vae")
    # a quantised text encoder gives other embeddings: they must never hit the full-precision ones
    quantized = "" if model.text_encoder_quantize == "none" else f"-{model.text_encoder_quantize}"
    text_dir = root / CACHE_FORMAT / "text" / f"{base.identity('text_encoder')}{quantized}"
    # repeats and shared references: hash once
    file_sha = functools.cache(lambda path: _sha(path.read_bytes()))
    latent_paths = [
        latent_dir / f"{file_sha(s.path)}_{s.bucket[0]}x{s.bucket[1]}.safetensors" for s in samples
    ]
    # references keep their own size (as at inference), so their key is the file alone
    ref_paths = [
        [latent_dir / f"ref_{file_sha(r)}.safetensors" for r in s.references] for s in samples
    ]
    captions = sorted({s.caption for s in samples} | {""} | set(extra_prompts))
    text_paths = {c: text_dir / f"{_sha(c.encode('utf-8'))}.safetensors" for c in captions}
    features = Features(latents=[], references=[], embeds={})

    missing_text = [c for c in captions if not text_paths[c].is_file()]
    if missing_text:
        pipe = load_pipeline(
            base,
            dtype,
            vae=False,
            transformer=False,
            device_map=device.type,
            text_encoder_quantize=model.text_encoder_quantize,
        )
        encoder = Encoder(pipe)
        for caption in tqdm(missing_text, desc="encoding captions", disable=not show_progress):
            _save(text_paths[caption], encoder.encode_prompts([caption]))
        features.text_encoder_calls = encoder.text_encoder_calls
        del pipe, encoder  # release the text encoder (the largest model) before training starts
        gc.collect()

    # cache path -> how to compute it with an Encoder: targets are fit to their bucket, references are not
    todo = {
        p: (lambda e, s=s: e.encode_image(fit(open_rgb(s.path), *s.bucket)))
        for p, s in zip(latent_paths, samples)
        if not p.is_file()
    }
    for paths, sample in zip(ref_paths, samples):
        for path, ref in zip(paths, sample.references):
            if not path.is_file():
                todo[path] = lambda e, ref=ref: _encode_reference(e, ref)
    if todo:
        encoder = Encoder(
            load_pipeline(base, dtype, text_encoder=False, transformer=False).to(device)
        )
        for path, encode in tqdm(todo.items(), desc="encoding images", disable=not show_progress):
            _save(path, encode(encoder))
            features.vae_calls += 1
        del encoder
        gc.collect()

    if any(s.mask for s in samples):
        features.masks = [token_mask(s) for s in samples]
    load_once = functools.cache(_load)  # repeated samples and shared references share one tensor
    features.latents = [load_once(p) for p in latent_paths]
    features.references = [[load_once(p) for p in paths] for paths in ref_paths]
    features.embeds = {c: _load(p) for c, p in text_paths.items()}
    return features
