"""Transformer inputs built by the stock pipeline's own code, for training and inference alike.

Every tensor the trainer feeds the transformer comes from a method of the family's diffusers pipeline:
`encode_prompt` (chat template, hidden-state layers, padding to 512), `image_processor.preprocess` and
`_encode_vae_image` (argmax latents, 2x2 patchify, batch-norm normalisation), `_pack_latents`,
`_prepare_latent_ids`, `_prepare_text_ids` and `_prepare_image_ids` (reference images at T = 10, 20, ...).
Nothing here re-derives those conventions, so they cannot drift from inference.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch
from PIL import Image

from inference.families import Family


@dataclasses.dataclass
class ModelInputs:
    # (B, N_target + N_refs, C): noisy target tokens, then reference tokens
    hidden_states: torch.Tensor
    img_ids: torch.Tensor  # (B, N_target + N_refs, 4)
    encoder_hidden_states: torch.Tensor  # (B, L, D)
    txt_ids: torch.Tensor  # (B, L, 4)
    num_target_tokens: int


def text_layers(pipeline_class, encoder_depth: int) -> tuple[int, ...]:
    """The hidden-state layers `encode_prompt` stacks into prompt embeddings: the pipeline's own (klein 9, 18, 27;
    dev 10, 20, 30), or, in a text encoder cut shorter than those reach (a depth-cut rehearsal model,
    inference/real_size.py), as many spread evenly over its depth."""
    import inspect

    own = tuple(
        inspect.signature(pipeline_class.encode_prompt)
        .parameters["text_encoder_out_layers"]
        .default
    )
    if max(own) <= encoder_depth:
        return own
    return tuple(max(1, round(encoder_depth * (i + 1) / len(own))) for i in range(len(own)))


def encoder_depth(text_encoder_config) -> int:
    """Layers of a text encoder (the language model's, for dev's vision-language Mistral-3)."""
    if isinstance(text_encoder_config, dict):
        return text_encoder_config.get("text_config", text_encoder_config)["num_hidden_layers"]
    return (
        getattr(text_encoder_config, "text_config", None) or text_encoder_config
    ).num_hidden_layers


class Encoder:
    """Prompt and image encoding through a loaded stock pipeline. Counts text-encoder calls."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.text_encoder_calls = 0

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        self.text_encoder_calls += 1
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            device=self.pipe.text_encoder.device,
            text_encoder_out_layers=text_layers(
                type(self.pipe), encoder_depth(self.pipe.text_encoder.config)
            ),
        )
        return embeds

    def to_pixels(self, image: Image.Image) -> torch.Tensor:
        """An RGB image already at its final (multiple of 16) size -> (1, 3, H, W) in [-1, 1], as the pipeline does."""
        return self.pipe.image_processor.preprocess(
            image, height=image.height, width=image.width, resize_mode="crop"
        )

    def reference_pixels(self, image: Image.Image) -> torch.Tensor:
        """A reference (conditioning) image the way the pipeline's __call__ prepares one (those lines are inline
        there, not a method): checked, shrunk to 1024^2 px if larger, floored to multiples of 16, centre-cropped."""
        processor = self.pipe.image_processor
        processor.check_image_input(image)
        if image.width * image.height > 1024 * 1024:
            image = processor._resize_to_target_area(image, 1024 * 1024)
        multiple = self.pipe.vae_scale_factor * 2
        width, height = image.width // multiple * multiple, image.height // multiple * multiple
        return processor.preprocess(image, height=height, width=width, resize_mode="crop")

    @torch.no_grad()
    def encode_reference(self, image: Image.Image) -> torch.Tensor:
        vae = self.pipe.vae
        return self.pipe._encode_vae_image(
            image=self.reference_pixels(image).to(vae.device, vae.dtype), generator=None
        )

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """-> normalised, patchified latents (1, 128, H/16, W/16), exactly as the pipeline encodes a reference image."""
        vae = self.pipe.vae
        pixels = self.to_pixels(image).to(device=vae.device, dtype=vae.dtype)
        return self.pipe._encode_vae_image(image=pixels, generator=None)


def build_inputs(
    family: Family,
    noisy_tokens: torch.Tensor,
    target_shape: torch.Size,
    prompt_embeds: torch.Tensor,
    references: Sequence[torch.Tensor] = (),
) -> ModelInputs:
    """Assemble one batch's transformer inputs.

    noisy_tokens: packed noisy target (B, h*w, 128); target_shape: the unpacked (B, 128, h, w);
    references: per reference slot, normalised latents (B, 128, h_i, w_i), in priority order.
    The transformer reads position ids from the first batch element, so every element shares one layout.
    """
    img_ids, txt_ids = _position_ids(
        family,
        tuple(target_shape),
        tuple(prompt_embeds.shape),
        tuple(tuple(r.shape) for r in references),
        noisy_tokens.device,
    )
    hidden = noisy_tokens
    if references:
        ref_tokens = torch.cat([family.pipeline_class._pack_latents(r) for r in references], dim=1)
        hidden = torch.cat([noisy_tokens, ref_tokens.to(noisy_tokens.dtype)], dim=1)
    return ModelInputs(hidden, img_ids, prompt_embeds, txt_ids, noisy_tokens.shape[1])


@functools.lru_cache(maxsize=64)
def _position_ids(
    family: Family,
    target_shape: tuple[int, ...],
    text_shape: tuple[int, ...],
    reference_shapes: tuple[tuple[int, ...], ...],
    device: torch.device,
):
    """(img_ids incl. references, txt_ids) from the pipeline's own builders. They depend on shapes only; built
    once per layout they stop costing a dozen small tensor ops every training step."""
    cls = family.pipeline_class
    latent_ids = cls._prepare_latent_ids(torch.empty(target_shape, device="meta"))
    txt_ids = cls._prepare_text_ids(torch.empty(text_shape, device="meta"))
    if reference_shapes:
        ref_ids = cls._prepare_image_ids(
            [torch.empty((1, *s[1:]), device="meta") for s in reference_shapes]
        )
        latent_ids = torch.cat([latent_ids, ref_ids.expand(target_shape[0], -1, -1)], dim=1)
    return latent_ids.to(device), txt_ids.to(device)


def predict_velocity(
    transformer, family: Family, inputs: ModelInputs, sigmas: torch.Tensor, guidance: float
):
    """Transformer forward in the pipeline's convention (timestep = sigma in [0, 1]); returns target tokens only."""
    batch = inputs.hidden_states.shape[0]
    out = transformer(
        hidden_states=inputs.hidden_states,
        timestep=sigmas.to(inputs.hidden_states.dtype),
        guidance=family.guidance_input(guidance, batch, inputs.hidden_states.device),
        encoder_hidden_states=inputs.encoder_hidden_states,
        txt_ids=inputs.txt_ids,
        img_ids=inputs.img_ids,
        return_dict=False,
    )[0]
    return out[:, : inputs.num_target_tokens]
