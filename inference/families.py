"""FLUX.2 model families behind one small interface: the only place that knows dev from klein.

Trainer and inference ask a `Family` for what differs (pipeline class, guidance input, sampling defaults,
licence, tiny twin) and never compare family names themselves. The family names exist here only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from inference import tiny


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    steps: int
    guidance: float


@dataclasses.dataclass(frozen=True)
class Variant:
    """A known size of a family, recognised from its transformer config."""

    name: str
    base_model: str  # the undistilled checkpoint (what LoRAs are usually trained on)
    licence: str
    num_layers: int | None  # double-stream blocks; None matches any size (tiny models)
    joint_attention_dim: int | None
    # the step-distilled checkpoint of the same size, if there is one
    distilled_model: str | None = None
    # folder under inference/architectures with its configs (model_index.json, transformer/ and text_encoder/
    # config.json), so the memory planner knows the model before (and without) a download
    architecture: str | None = None

    def hub_id(self, distilled: bool) -> str:
        return self.distilled_model if distilled and self.distilled_model else self.base_model


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    pipeline_class_name: str
    # Hidden-state layers the stock pipeline stacks into prompt embeddings. Kept here for docs and a test that
    # pins them to the pipeline's own default; conditioning always calls the pipeline's encode_prompt.
    text_encoder_layers: tuple[int, ...]
    has_guidance_embedding: bool
    # Real classifier-free guidance against the empty prompt (klein base) takes negative_prompt_embeds.
    has_true_cfg: bool
    variants: tuple[Variant, ...]
    _defaults: Callable[[bool], SamplingDefaults]
    # whether the pipeline has an `is_distilled` switch (a step-distilled checkpoint of the same architecture)
    has_distilled: bool
    # builds the tiny text encoder + tokenizer of this family's real architecture (inference/tiny.py)
    tiny_text_stack: Callable[[], tuple[Any, Any]]

    @property
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def sampling_defaults(self, distilled: bool) -> SamplingDefaults:
        return self._defaults(distilled)

    def pipeline_options(self, distilled: bool) -> dict[str, Any]:
        """Extra constructor arguments of the family's pipeline (klein's `is_distilled`)."""
        if distilled and not self.has_distilled:
            raise ValueError(f"FLUX.2 {self.name} has no step-distilled variant")
        return {"is_distilled": distilled} if self.has_distilled else {}

    def guidance_input(
        self, value: float, batch_size: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor | None:
        """What the transformer's `guidance` argument gets, as the pipeline builds it (raw value; x1000 inside)."""
        if not self.has_guidance_embedding:
            return None
        return torch.full([batch_size], float(value), device=device, dtype=torch.float32)

    def variant(self, transformer_config: dict[str, Any]) -> Variant:
        for v in self.variants:
            if v.num_layers is None:
                continue
            if (
                transformer_config.get("num_layers"),
                transformer_config.get("joint_attention_dim"),
            ) == (
                v.num_layers,
                v.joint_attention_dim,
            ):
                return v
        return Variant(
            f"{self.name} (custom size)", "unknown", "see the base model's licence", None, None
        )


DEV = Family(
    name="dev",
    pipeline_class_name="Flux2Pipeline",
    text_encoder_layers=(10, 20, 30),
    has_guidance_embedding=True,
    has_true_cfg=False,
    variants=(
        Variant(
            "FLUX.2 [dev] 32B",
            "black-forest-labs/FLUX.2-dev",
            "flux-dev-non-commercial-license",
            8,
            15360,
            architecture="flux2-dev",
        ),
        Variant(
            "tiny random FLUX.2 [dev] (test model)",
            "flux2-lora tiny-model --random --family dev",
            "apache-2.0",
            1,
            48,
        ),
        Variant(
            "tiny FLUX.2 [dev] pretrained on synthetic shapes",
            "flux2-lora tiny-model --family dev",
            "apache-2.0",
            2,
            48,
        ),
    ),
    _defaults=lambda distilled: SamplingDefaults(steps=50, guidance=4.0),
    has_distilled=False,
    tiny_text_stack=tiny.mistral3_text_stack,
)

KLEIN = Family(
    name="klein",
    pipeline_class_name="Flux2KleinPipeline",
    text_encoder_layers=(9, 18, 27),
    has_guidance_embedding=False,
    has_true_cfg=True,
    variants=(
        Variant(
            "FLUX.2 [klein] 4B",
            "black-forest-labs/FLUX.2-klein-base-4B",
            "apache-2.0",
            5,
            7680,
            "black-forest-labs/FLUX.2-klein-4B",
            architecture="flux2-klein-base-4b",
        ),
        Variant(
            "FLUX.2 [klein] 9B",
            "black-forest-labs/FLUX.2-klein-base-9B",
            "flux-non-commercial-license",
            8,
            12288,
            "black-forest-labs/FLUX.2-klein-9B",
            architecture="flux2-klein-base-9b",
        ),
        Variant(
            "tiny random FLUX.2 [klein] (test model)",
            "flux2-lora tiny-model --random --family klein",
            "apache-2.0",
            1,
            48,
        ),
        Variant(
            "tiny FLUX.2 [klein] pretrained on synthetic shapes",
            "flux2-lora tiny-model --family klein",
            "apache-2.0",
            2,
            48,
        ),
    ),
    # Distilled klein is step-distilled: 4 steps, no CFG. Base klein runs real CFG.
    _defaults=lambda distilled: (
        SamplingDefaults(steps=4, guidance=1.0) if distilled else SamplingDefaults(50, 4.0)
    ),
    has_distilled=True,
    tiny_text_stack=tiny.qwen3_text_stack,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (DEV, KLEIN)}
# the config key `model.family` and `--family` flags accept these
FamilyChoice = Literal[("auto", *FAMILIES)]  # type: ignore[valid-type]


ARCHITECTURES_DIR = Path(__file__).resolve().parent / "architectures"


def shipped_config(hub_id: str, filename: str) -> Path | None:
    """A config file of a known FLUX.2 checkpoint shipped with the package (its distilled twin has the same
    architecture), or None. model_index.json of a distilled id says so, as the real one does."""
    for fam in FAMILIES.values():
        for v in fam.variants:
            if v.architecture and hub_id in (v.base_model, v.distilled_model):
                if filename == "model_index.json" and hub_id == v.distilled_model:
                    return ARCHITECTURES_DIR / v.architecture / "model_index.distilled.json"
                path = ARCHITECTURES_DIR / v.architecture / filename
                return path if path.is_file() else None
    return None


def family_for_pipeline_class(class_name: str) -> Family | None:
    for fam in FAMILIES.values():
        if fam.pipeline_class_name == class_name:
            return fam
    return None
