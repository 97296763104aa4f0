"""Generation with the stock FLUX.2 pipelines and any set of LoRA adapters.

gen = Generator("path/or/hub-id")                 # the base loads once
gen.add_adapter("brand.safetensors", scale=0.8)   # hot-swap: add, rescale, remove without reloading
images = gen.generate("zxq logo on a mug", seed=1)
images = gen.generate("make it blue", image=photo, references=[logo])   # edit + multi-reference
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from common.configtree import from_kwargs, non_negative, option, positive
from common.errors import UserError
from common.images import open_rgb
from common.limits import MAX_REFERENCES, SIDE_MULTIPLE, nearest_side
from common.trigger import with_trigger
from inference.adapters import AdapterInfo, load_adapter
from inference.loading import (
    ModelConfig,
    apply_memory_options,
    load_pipeline,
    resolve_base_model,
)
from inference.quantize import QUANTIZE_HELP, Quantize, quantize_problem
from inference.runs import lora_file, lora_label

log = logging.getLogger("flux2_lora.generate")

PROMPT_CACHE = 32


@dataclasses.dataclass
class Generated:
    image: Image.Image
    # everything needed to reproduce it; written into the PNG by provenance.save_png
    record: dict[str, Any]


def _adapter_name(text: str) -> str:
    """peft stores adapters as submodules: the name must be an identifier that is not a torch.nn.Module attribute."""
    name = re.sub(r"\W", "_", text) or "lora"
    return f"lora_{name}" if hasattr(torch.nn.Module, name) or name[0].isdigit() else name


def _device_available(device: str) -> bool:
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):
        return False
    return True


def round_side(value: int, what: str) -> int:
    rounded = nearest_side(value)
    if rounded != value:
        log.warning("%s %d is not a multiple of %d; using %d", what, value, SIDE_MULTIPLE, rounded)
    return rounded


@dataclasses.dataclass
class Request:
    """The numbers of one generation, checked by one rule wherever they come from: `generate`'s flags, a line of
    `--prompts` JSONL, or `Generator.generate`'s arguments."""

    prompt: str = option(help="the prompt")
    seed: int = option(0, help="seed of the first image; image i uses seed + i")
    width: int | None = option(
        None, check=positive, help="default: the edit image's width, else 1024"
    )
    height: int | None = option(
        None, check=positive, help="default: the edit image's height, else 1024"
    )
    steps: int | None = option(None, check=positive, help="denoising steps (default: the family's)")
    guidance: float | None = option(
        None, check=non_negative, help="guidance scale (default: the family's)"
    )
    num_images: int = option(1, check=positive, help="images per prompt")


# Far beyond any useful strength (ComfyUI's slider stops at ±100), and a scale of 1e9 overflows to NaN pixels.
MAX_LORA_SCALE = 100.0


def scale_problem(scale: float) -> str | None:
    """Why a LoRA scale cannot be used, or None: it must be a finite number within ±MAX_LORA_SCALE."""
    if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
        return f"must be a finite number between -{MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}, got {scale:g}"
    return None


def _flat_or_broken(pixels: np.ndarray) -> str | None:
    """What is wrong with a rendered image as floats in [0, 1], or None: non-finite values (the model or a
    LoRA overflowed), or one flat colour (a PNG of it says nothing)."""
    if not np.isfinite(pixels).all():
        return "non-finite"
    if float(pixels.max() - pixels.min()) == 0.0:
        return "flat"
    return None


@dataclasses.dataclass
class GeneratorOptions:
    """How the base model is loaded and placed: `generate`'s flags and `Generator(...)`'s keyword arguments."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="dtype of the model weights; auto: bfloat16 on a GPU, float32 on the CPU"
    )
    device: str = option(
        "auto",
        help="where the models run: auto (the GPU when there is one), cpu, cuda, cuda:1, ...",
    )
    quantize: Quantize = option("none", help=f"the transformer's weights: {QUANTIZE_HELP}")
    group_offload: Literal["none", "block", "leaf"] = option(
        "none",
        help="keep weights in CPU RAM and stream a block (or a layer) at a time to the device",
    )
    cpu_offload: bool = option(
        False, help="model CPU offload: whole models moved to the GPU on demand (needs a GPU)"
    )
    vae_tiling: bool = option(False, help="decode large images in tiles")

    def validate(self) -> list[str]:
        if self.cpu_offload and self.group_offload != "none":
            return ["cpu_offload and group_offload are two ways to offload; choose one"]
        return []


def resolve_placement(device: str, dtype: str) -> tuple[str, str]:
    """'auto' device -> the GPU when there is one, else the CPU; 'auto' dtype -> bfloat16 there, float32 on the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    return device, dtype


def cpu_dtype(base) -> str:
    """The dtype a CPU run of `base` gets by default: float32 (the CPU's fast path) when the pipeline fits in 80 %
    of this machine's RAM that way, else bfloat16, said in one line (klein-4B's float32 pipeline needs ~30 GiB)."""
    from common.machine import detected_ram

    params = sum(p.numel() for p in base.empty_transformer().parameters())
    params += (
        sum(p.numel() for p in base.empty_text_encoder().parameters()) + 84_000_000
    )  # + FLUX.2's VAE
    needed, ram = params * 4 / 2**30, detected_ram()
    if needed <= 0.8 * ram:
        return "float32"
    log.warning(
        "float32 would need %.0f GiB of this machine's %.0f GiB RAM: running in bfloat16 (--dtype to choose)",
        needed,
        ram,
    )
    return "bfloat16"


class Generator:
    def __init__(self, model: str, **options: Any):
        """`options`: the fields of GeneratorOptions (dtype="bfloat16", device="cuda", group_offload="block", ...)."""
        opts = self.options = from_kwargs(GeneratorOptions, "Generator", **options)
        device, dtype = resolve_placement(opts.device, opts.dtype)
        if device != "cpu" and not _device_available(device):
            raise UserError(f"device '{device}' is not available on this machine; use --device cpu")
        if problem := quantize_problem(opts.quantize, "quantize", torch.device(device).type):
            raise UserError(problem)
        self.config = ModelConfig(
            path=str(model), dtype=dtype, quantize=opts.quantize, group_offload=opts.group_offload
        )
        self.base = resolve_base_model(self.config)
        if opts.dtype == "auto" and device == "cpu":
            dtype = self.config.dtype = cpu_dtype(self.base)
        self.pipe = load_pipeline(self.base, dtype, quantize=opts.quantize)
        self.family = self.base.family
        self.defaults = self.family.sampling_defaults(self.base.distilled)
        if opts.cpu_offload:
            if not torch.cuda.is_available():
                raise UserError(
                    "model CPU offload needs a GPU; on a CPU-only machine leave it off "
                    "(or use group offload to keep weights in RAM)"
                )
            self.pipe.enable_model_cpu_offload()  # moves whole models to the GPU on demand
        else:
            apply_memory_options(self.pipe.transformer, self.config, torch.device(device))
            if opts.group_offload == "none":
                self.pipe.to(device)
        if opts.vae_tiling:
            self.pipe.vae.enable_tiling()
        self.adapters: dict[str, AdapterInfo] = {}
        self.scales: dict[str, float] = {}
        self.fused = False
        self.baked: list[dict[str, Any]] = []  # adapters merged for good by fuse(permanent=True)
        self._embeds: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.text_encoder_calls = 0

    # ---- adapters -------------------------------------------------------------------------------------------
    def add_adapter(
        self,
        path: str | Path,
        scale: float = 1.0,
        name: str | None = None,
        allow_partial: bool = False,
    ) -> AdapterInfo:
        self._require_unfused()
        path = lora_file(path)  # a run folder means its final LoRA
        if problem := scale_problem(float(scale)):
            raise UserError(f"LoRA '{path}': its scale {problem}")
        name = _adapter_name(name or lora_label(path))
        if name in self.adapters:
            raise UserError(f"an adapter named '{name}' is already loaded; pass another name")
        info = load_adapter(self.pipe, self.family.name, path, name, allow_partial)
        self.adapters[name], self.scales[name] = info, float(scale)
        self._apply_scales()
        return info

    def set_scales(self, scales: dict[str, float]) -> None:
        self._require_unfused()
        unknown = set(scales) - set(self.adapters)
        if unknown:
            raise UserError(
                f"no adapter named {', '.join(sorted(unknown))}; loaded: {', '.join(self.adapters) or 'none'}"
            )
        for name, scale in scales.items():
            if problem := scale_problem(float(scale)):
                raise UserError(f"adapter '{name}': its scale {problem}")
        self.scales.update({k: float(v) for k, v in scales.items()})
        self._apply_scales()

    def remove_adapter(self, name: str) -> None:
        self._require_unfused()
        self.pipe.delete_adapters(name)
        self.adapters.pop(name), self.scales.pop(name)
        self._apply_scales()

    def fuse(self, permanent: bool = False) -> None:
        """Merge the active adapters (at their scales) into the base weights. Reversible with unfuse(); with
        `permanent` the LoRA layers are also removed, so a step costs exactly what the base's costs."""
        if self.adapters and not self.fused:
            self.pipe.fuse_lora(
                components=["transformer"], lora_scale=1.0, adapter_names=list(self.adapters)
            )
            self.fused = True
        if permanent and self.fused:
            self.baked += self._lora_records()
            self.pipe.unload_lora_weights()  # keeps the merged weights, drops the peft wrappers
            self.adapters, self.scales, self.fused = {}, {}, False

    def unfuse(self) -> None:
        if self.fused:
            self.pipe.unfuse_lora(components=["transformer"])
            self.fused = False

    def _lora_records(self) -> list[dict[str, Any]]:
        return [
            {
                "name": n,
                "path": str(a.path),
                "sha256": a.sha256,
                "scale": self.scales[n],
                "fused": self.fused,
                "trigger": a.trigger,
            }
            for n, a in self.adapters.items()
        ]

    def _apply_scales(self) -> None:
        if self.adapters:
            self.pipe.set_adapters(list(self.adapters), [self.scales[n] for n in self.adapters])

    def _require_unfused(self) -> None:
        if self.fused:
            raise UserError("adapters are fused; call unfuse() before changing them")

    # ---- generation -----------------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        *,
        image: Image.Image | str | Path | None = None,
        references: Sequence[Image.Image | str | Path] = (),
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        num_images: int = 1,
        add_trigger: bool = False,
    ) -> list[Generated]:
        req = from_kwargs(
            Request,
            "generate",
            prompt=prompt,
            seed=seed,
            width=width,
            height=height,
            steps=steps,
            guidance=guidance,
            num_images=num_images,
        )
        prompt, seed, width, height, num_images = (
            req.prompt,
            req.seed,
            req.width,
            req.height,
            req.num_images,
        )
        images = [self._image(x) for x in ([image] if image is not None else []) + list(references)]
        if len(images) > MAX_REFERENCES:
            raise UserError(
                f"{len(images)} reference images given; FLUX.2 takes at most {MAX_REFERENCES} "
                "(the edit image counts as one)"
            )
        if images:
            width = width or images[0].width
            height = height or images[0].height
        width = round_side(width or 1024, "width")
        height = round_side(height or 1024, "height")
        steps = self.defaults.steps if req.steps is None else req.steps
        guidance = self.defaults.guidance if req.guidance is None else req.guidance
        if add_trigger:  # adapters fused for good keep their trigger words in self.baked
            for trigger in [r["trigger"] for r in self.baked] + [
                a.trigger for a in self.adapters.values()
            ]:
                prompt = with_trigger(prompt, trigger or None)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
        embeds = {"prompt_embeds": self.prompt_embeds(prompt)}
        if self.family.has_true_cfg:
            embeds["negative_prompt_embeds"] = self.prompt_embeds("")
        try:
            out = self.pipe(
                image=images or None,
                width=width,
                height=height,
                num_inference_steps=steps,
                guidance_scale=guidance,
                num_images_per_prompt=num_images,
                generator=generators,
                output_type="np",  # checked for NaN and flat colour before it becomes a picture
                **embeds,
            )
        # the pipeline's own input checks (e.g. a reference image under 64 px)
        except ValueError as exc:
            raise UserError(f"generation refused: {str(exc).splitlines()[0]}") from None
        record = {
            "prompt": prompt,
            "width": width,
            "height": height,
            "steps": steps,
            "guidance": guidance,
            "base_model": self.base.path,
            "family": self.family.name,
            "fused": self.fused,
            "references": len(images),
            "edit": image is not None,
            "loras": self.baked + self._lora_records(),
        }
        return [
            Generated(img, {**record, "seed": seed + i})
            for i, img in enumerate(self._pictures(out.images, record, seed))
        ]

    def _pictures(self, pixels: np.ndarray, record: dict[str, Any], seed: int) -> list[Image.Image]:
        """The pipeline's float output as PIL images (what output_type="pil" gives), refusing NaN or infinite
        pixels and saying when an image is one flat colour."""
        for i, image in enumerate(pixels):
            what = f"'{record['prompt']}' (seed {seed + i})"
            problem = _flat_or_broken(image)
            if problem == "non-finite":
                scales = (
                    ", ".join(f"{r['name']} x{r['scale']:g}" for r in record["loras"]) or "no LoRA"
                )
                raise UserError(
                    f"generation of {what} gave NaN or infinite pixels ({scales}); lower the LoRA "
                    "scales or check the LoRA files; nothing was written"
                )
            if problem == "flat":
                log.warning(
                    "the image of %s is one flat colour; check the prompt, steps and LoRA scales",
                    what,
                )
        return self.pipe.image_processor.numpy_to_pil(pixels)

    @torch.no_grad()
    def prompt_embeds(self, prompt: str) -> torch.Tensor:
        """The pipeline's own encode_prompt, once per distinct prompt: LoRAs act on the transformer only, so the
        embeddings do not change when adapters or scales do. The last PROMPT_CACHE prompts are kept (a real
        klein-4B embedding is ~8 MB)."""
        if prompt in self._embeds:
            self._embeds.move_to_end(prompt)
        else:
            self.text_encoder_calls += 1
            self._embeds[prompt] = self.pipe.encode_prompt(
                prompt=prompt, device=self.pipe._execution_device
            )[0]
            if len(self._embeds) > PROMPT_CACHE:
                self._embeds.popitem(last=False)
        return self._embeds[prompt]

    @staticmethod
    def _image(value: Image.Image | str | Path) -> Image.Image:
        return value.convert("RGB") if isinstance(value, Image.Image) else open_rgb(value)
