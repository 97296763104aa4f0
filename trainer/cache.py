"""Latents and prompt embeddings, computed once and kept on disk as safetensors.

A file's name is the hash of everything that went into its tensor, so a cached tensor never serves a run that
would have computed a different one, and nothing else misses:
- embeddings: the caption, the text encoder's and tokenizer's files, their dtype and quantisation, the pipeline's
  max sequence length and hidden-state layers, and the diffusers / transformers versions (chat templates and
  system messages live in their code);
- latents: the image file, its bucket, the VAE's files and dtype, and the diffusers version.
Files are written atomically (temporary file, fsync, rename), so several processes and machines may fill one
cache at once. A run of several processes splits the missing entries by hash between the processes of each
machine (`fill_cache`'s share), then meets at one barrier before every process loads them all.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import json
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
from inference.conditioning import Encoder, encoder_depth, text_layers
from inference.loading import BaseModel, ModelConfig, load_pipeline
from trainer.phases import QUIET, TEXT_ENCODER, VAE, Phases


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


# Bump when image reading/resizing or the key scheme changes: old entries then simply miss.
CACHE_FORMAT = "v2"


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


def _key(parts: dict) -> str:
    return _sha(json.dumps(parts, sort_keys=True).encode())[:16]


def cache_dirs(base: BaseModel, model: ModelConfig, root: Path) -> tuple[Path, Path]:
    """(embeddings folder, latents folder) of this model and setting: every input that changes a tensor is in
    the folder's key (the module docstring lists them)."""
    import inspect

    import diffusers
    import transformers

    prompt_defaults = inspect.signature(base.family.pipeline_class.encode_prompt).parameters
    text = _key(
        {
            "text_encoder": base.identity("text_encoder"),
            "tokenizer": base.identity("tokenizer"),
            "dtype": model.dtype,
            "quantize": model.text_encoder_quantize,
            "max_sequence_length": prompt_defaults["max_sequence_length"].default,
            "layers": list(
                text_layers(
                    base.family.pipeline_class, encoder_depth(base.component_config("text_encoder"))
                )
            ),
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        }
    )
    latents = _key(
        {"vae": base.identity("vae"), "dtype": model.dtype, "diffusers": diffusers.__version__}
    )
    return root / CACHE_FORMAT / "text" / text, root / CACHE_FORMAT / "latents" / latents


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Where each feature of a run lives in the cache, from content hashes alone (no encoder loaded)."""

    latents: list[Path]  # per sample
    references: list[list[Path]]  # per sample, per reference image
    texts: dict[str, Path]  # caption -> its embedding


def cache_layout(
    samples: list[Sample],
    base: BaseModel,
    model: ModelConfig,
    cfg: CacheConfig,
    extra_prompts: tuple[str, ...] = (),
) -> CacheLayout:
    text_dir, latent_dir = cache_dirs(base, model, Path(cfg.dir).expanduser())
    # repeats and shared references: hash once
    file_sha = functools.cache(lambda path: _sha(path.read_bytes()))
    latents = [
        latent_dir / f"{file_sha(s.path)}_{s.bucket[0]}x{s.bucket[1]}.safetensors" for s in samples
    ]
    # references keep their own size (as at inference), so their key is the file alone
    references = [
        [latent_dir / f"ref_{file_sha(r)}.safetensors" for r in s.references] for s in samples
    ]
    captions = sorted({s.caption for s in samples} | {""} | set(extra_prompts))
    texts = {c: text_dir / f"{_sha(c.encode('utf-8'))}.safetensors" for c in captions}
    return CacheLayout(latents, references, texts)


def _mine(path: Path, share: tuple[int, int]) -> bool:
    """Whether the process `share` = (index, count) encodes this entry: split by the entry's content hash."""
    index, count = share
    return int(hashlib.sha256(path.name.encode()).hexdigest()[:8], 16) % count == index


def fill_cache(
    layout: CacheLayout,
    samples: list[Sample],
    base: BaseModel,
    model: ModelConfig,
    cfg: CacheConfig,
    show_progress: bool = True,
    device: torch.device | str = "cpu",
    share: tuple[int, int] = (0, 1),
    phases: Phases = QUIET,
) -> tuple[int, int]:
    """Encode this process's share of what is not cached yet -> (text-encoder calls, VAE calls). Each encoder
    loads only when its share is not empty, and is freed before this returns."""
    device = torch.device("cpu" if cfg.device == "cpu" else device)
    dtype = model.dtype
    missing_text = [c for c, p in layout.texts.items() if _mine(p, share) and not p.is_file()]
    text_calls = vae_calls = 0
    if missing_text:
        with phases.phase(TEXT_ENCODER):
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
                _save(layout.texts[caption], encoder.encode_prompts([caption]))
            text_calls = encoder.text_encoder_calls
            del pipe, encoder  # release the text encoder (the largest model) before training starts
            _release_memory()

    # cache path -> how to compute it with an Encoder: targets are fit to their bucket, references are not
    todo = {
        p: (lambda e, s=s: e.encode_image(fit(open_rgb(s.path), *s.bucket)))
        for p, s in zip(layout.latents, samples)
        if _mine(p, share) and not p.is_file()
    }
    for paths, sample in zip(layout.references, samples):
        for path, ref in zip(paths, sample.references):
            if _mine(path, share) and not path.is_file():
                todo[path] = lambda e, ref=ref: _encode_reference(e, ref)
    if todo:
        with phases.phase(VAE):
            encoder = Encoder(
                load_pipeline(base, dtype, text_encoder=False, transformer=False).to(device)
            )
            for path, encode in tqdm(
                todo.items(), desc="encoding images", disable=not show_progress
            ):
                _save(path, encode(encoder))
                vae_calls += 1
            del encoder
            _release_memory()
    return text_calls, vae_calls


def _release_memory() -> None:
    """Give a freed encoder's memory back before the next model loads: the Python objects, then the CUDA caching
    allocator's blocks (without empty_cache they stay reserved and the transformer loads beside them)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_features(layout: CacheLayout, samples: list[Sample]) -> Features:
    """Every cached tensor of the run, in memory (the cache must be complete)."""
    missing = [
        p
        for p in [
            *layout.latents,
            *(r for refs in layout.references for r in refs),
            *layout.texts.values(),
        ]
        if not p.is_file()
    ]
    if missing:
        raise UserError(
            f"cache.dir: {len(missing)} cached features are missing after the cache was filled (e.g. "
            f"{missing[0]}); on several machines give each its own cache.dir or one shared folder"
        )
    load_once = functools.cache(_load)  # repeated samples and shared references share one tensor
    return Features(
        latents=[load_once(p) for p in layout.latents],
        references=[[load_once(p) for p in paths] for paths in layout.references],
        embeds={c: _load(p) for c, p in layout.texts.items()},
        masks=[token_mask(s) for s in samples] if any(s.mask for s in samples) else [],
    )


def build_features(
    samples: list[Sample],
    base: BaseModel,
    model: ModelConfig,
    cfg: CacheConfig,
    show_progress: bool = True,
    device: torch.device | str = "cpu",
    extra_prompts: tuple[str, ...] = (),
) -> Features:
    """One process: encode what is not cached yet (captions, "", and `extra_prompts` such as sample prompts),
    then load it all."""
    layout = cache_layout(samples, base, model, cfg, extra_prompts)
    text_calls, vae_calls = fill_cache(layout, samples, base, model, cfg, show_progress, device)
    features = load_features(layout, samples)
    features.text_encoder_calls, features.vae_calls = text_calls, vae_calls
    return features
