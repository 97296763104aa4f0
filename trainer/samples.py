"""Sample images rendered during training through the stock pipeline, from cached prompt embeddings.

The text encoder is gone by the time training runs, so sample prompts are encoded with the captions (and
cached the same way); the pipeline gets `prompt_embeds` and the training transformer itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from PIL import Image

from common.atomic import atomic_path
from common.configtree import non_negative, option
from common.limits import side_problem
from inference.grids import make_grid
from inference.loading import DTYPES, BaseModel, load_pipeline


@dataclasses.dataclass
class SampleConfig:
    prompts: list[str] = option(
        factory=list, help="prompts rendered every sample.every steps (fixed seeds)"
    )
    every: int = option(
        0, check=non_negative, help="0: only the before/after grid at the end (if prompts are set)"
    )
    seed: int = option(0)
    steps: int | None = option(None, help="denoising steps; default: the family's")
    guidance: float | None = option(None, help="default: the family's")
    width: int | None = option(None, check=side_problem, help="default: train.resolution")
    height: int | None = option(None, check=side_problem, help="default: train.resolution")
    before_after: bool = option(
        True, help="at the end, a grid of each prompt without (scale 0) and with the LoRA"
    )


class SampleRenderer:
    def __init__(
        self,
        base: BaseModel,
        dtype: str,
        cfg: SampleConfig,
        embeds: dict[str, torch.Tensor],
        resolution: int,
        out_dir: Path,
        device: torch.device | str = "cpu",
        write: bool = True,
    ):
        self.base, self.cfg, self.out_dir, self.write = base, cfg, out_dir, write
        self.dtype = DTYPES[dtype]
        # VAE + scheduler only, on the training device: latents are made where the transformer runs, and a VAE
        # left on the CPU would be handed GPU latents at the first sample (the crash ai-toolkit fixed in #742)
        self.device = torch.device(device)
        self.pipe = load_pipeline(base, dtype, text_encoder=False, transformer=False).to(
            self.device
        )
        self.embeds = [embeds[p] for p in cfg.prompts]
        self.negative = embeds[""]
        defaults = base.family.sampling_defaults(base.distilled)
        self.steps = cfg.steps or defaults.steps
        self.guidance = defaults.guidance if cfg.guidance is None else cfg.guidance
        self.size = (cfg.width or resolution, cfg.height or resolution)

    @torch.no_grad()
    def render(self, transformer) -> list[Image.Image]:
        was_training = transformer.training
        transformer.eval()
        # the pipeline from its parts, not from_pipe: that casts every component to its dtype argument (float32
        # when none is given), which would turn the training transformer's bf16 weights, or its float32 LoRA, into
        # the other for the rest of the run
        pipe = self.base.family.pipeline_class(
            scheduler=self.pipe.scheduler,
            vae=self.pipe.vae,
            text_encoder=None,
            tokenizer=None,
            transformer=transformer,
            **self.base.family.pipeline_options(self.base.distilled),
        )
        pipe.set_progress_bar_config(disable=True)
        # declared, not read off the weights: group offload keeps those on the CPU
        device = self.device
        extra = {}
        images = []
        for i, embeds in enumerate(self.embeds):
            if self.base.family.has_true_cfg:
                extra = {"negative_prompt_embeds": self.negative.to(device, embeds.dtype)}
            # the transformer's output is float32 where the float32 LoRA adds in; autocast keeps every step,
            # and the VAE's decode, in the model's dtype, as training's forward is
            with self._autocast():
                images += pipe(
                    prompt_embeds=embeds.to(device),
                    width=self.size[0],
                    height=self.size[1],
                    num_inference_steps=self.steps,
                    guidance_scale=self.guidance,
                    generator=torch.Generator().manual_seed(self.cfg.seed + i),
                    **extra,
                ).images
        transformer.train(was_training)
        return images

    def _autocast(self):
        # half precision runs under autocast; a float32 model, or the meta device of the placement tests, as is
        if self.dtype == torch.float32 or self.device.type not in ("cuda", "cpu"):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def save_grid(self, name: str, images: list[Image.Image], **layout) -> Image.Image:
        grid = make_grid(images, columns=len(self.cfg.prompts), **layout)
        if self.write:  # a sharded run renders on every rank; rank 0 writes
            with atomic_path(self.out_dir / "samples" / name) as tmp:
                grid.save(tmp, format="PNG")
        return grid

    def _labels(self) -> list[str]:
        return [f"{p}\nseed {self.cfg.seed + i}" for i, p in enumerate(self.cfg.prompts)]

    def at_step(self, transformer, step: int) -> Image.Image:
        return self.save_grid(
            f"step-{step:06d}.png",
            self.render(transformer),
            labels=self._labels(),
            title=f"step {step}: {self.steps} sampling steps, guidance {self.guidance:g}",
        )

    def before_after(self, transformer, step: int) -> Image.Image:
        """Row 1: LoRA off (scale 0); row 2: LoRA on (scale 1). Same seeds, same prompts."""
        transformer.disable_adapters()
        try:
            before = self.render(transformer)
        finally:
            transformer.enable_adapters()
        after = self.render(transformer)
        return self.save_grid(
            "before_after.png",
            before + after,
            labels=[""] * len(before) + self._labels(),
            row_labels=["without the LoRA", f"with the LoRA (step {step})"],
            title=f"before / after {step} steps: same prompts, same seeds",
        )
