"""The training config tree: defaults <- YAML <- dotted overrides, validated once before any weights load.

Each section is defined next to the code that reads it; this file only assembles them. The key paths
model.path, model.family, data.path, data.trigger, train.steps, train.batch_size, train.resolution,
train.seed, optim.lr, lora.rank, lora.alpha, output.dir, checkpoint.every and resume are a public contract.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from common.configtree import (
    apply_overrides,
    from_dict,
    option,
    read_yaml,
    to_dict,
    type_name,
)
from data_tools.dataset import DataConfig
from inference.export import export_problem
from inference.families import FAMILIES
from inference.loading import ModelConfig
from trainer.cache import CacheConfig
from trainer.checkpoints import CheckpointConfig
from trainer.ema import EmaConfig
from trainer.flow import FlowConfig
from trainer.lora import LoraSettings
from trainer.memory import MemoryConfig
from trainer.optim import OptimConfig
from trainer.outputs import OutputConfig
from trainer.regularization import RegularizationConfig
from trainer.samples import SampleConfig
from trainer.step import TrainSettings
from trainer.validation import ValidationConfig


@dataclasses.dataclass
class Config:
    model: ModelConfig = option(factory=ModelConfig)
    data: DataConfig = option(factory=DataConfig)
    train: TrainSettings = option(factory=TrainSettings)
    flow: FlowConfig = option(factory=FlowConfig)
    lora: LoraSettings = option(factory=LoraSettings)
    optim: OptimConfig = option(factory=OptimConfig)
    checkpoint: CheckpointConfig = option(factory=CheckpointConfig)
    output: OutputConfig = option(factory=OutputConfig)
    cache: CacheConfig = option(factory=CacheConfig)
    sample: SampleConfig = option(factory=SampleConfig)
    regularization: RegularizationConfig = option(factory=RegularizationConfig)
    ema: EmaConfig = option(factory=EmaConfig)
    validation: ValidationConfig = option(factory=ValidationConfig)
    memory: MemoryConfig = option(factory=MemoryConfig)
    resume: str | None = option(None, help="latest, or a checkpoints/step-N folder")

    def validate(self) -> list[str]:
        """Checks that involve more than one section, all reported at once."""
        problems, steps = [], self.train.steps
        if self.optim.warmup_steps >= steps:
            problems.append(
                f"optim.warmup_steps ({self.optim.warmup_steps}) must be below train.steps ({steps}), "
                "or the learning rate never reaches optim.lr"
            )
        family = FAMILIES.get(self.model.family)
        if family is not None and not family.has_guidance_embedding and self.train.guidance != 1.0:
            problems.append(
                f"train.guidance is set, but FLUX.2 {family.name} has no guidance embedding; remove it"
            )
        if self.sample.every > steps:
            problems.append(
                f"sample.every ({self.sample.every}) is beyond train.steps ({steps}): no sample would be "
                "rendered during training; lower it, or 0 for the before/after grid only"
            )
        if self.sample.every and not self.sample.prompts:
            problems.append(
                "sample.every is set but sample.prompts is empty; add prompts to render"
            )
        if self.regularization.preserve and not self.data.trigger:
            problems.append(
                "regularization.preserve replaces the trigger word in captions, but data.trigger is not set"
            )
        if self.validation.every and not self.validation.enabled:
            problems.append(
                "validation.every is set but nothing is held out; set validation.images or validation.split"
            )
        if self.validation.every > steps:
            problems.append(
                f"validation.every ({self.validation.every}) is beyond train.steps ({steps})"
            )
        if self.model.quantize != "none" and self.lora.type in ("lokr", "loha"):
            problems.append(
                f"lora.type: {self.lora.type} wraps plain Linear layers only (peft's LyCORIS layers) and "
                f"model.quantize: {self.model.quantize} replaces them; use lora.type: lora or dora, or "
                "model.quantize: none"
            )
        for fmt in self.output.export:
            if problem := export_problem(self.lora.type, fmt):
                problems.append(f"output.export: {problem}")
        if self.checkpoint.every > steps:
            problems.append(
                f"checkpoint.every ({self.checkpoint.every}) is beyond train.steps ({steps}): no "
                "checkpoint would be written; lower it, or 0 for checkpoints on signals only"
            )
        return problems


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    data = read_yaml(path) if path else {}
    apply_overrides(data, list(overrides))
    return from_dict(Config, data)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_reference() -> str:
    """docs/config.md, generated from the dataclasses so it cannot drift (a test checks it is current)."""
    lines = [
        "# Config reference",
        "",
        "Generated by `flux2-lora config-reference`; every key, its type, default and meaning.",
        "Set them in YAML or as dotted overrides (`optim.lr=5e-5`).",
        "",
    ]

    def walk(cls, prefix: str) -> None:
        rows = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = f.metadata.get("shown_default") or (
                list(default) if isinstance(default, tuple) else default
            )
            kind = type_name(hints[f.name]).replace("|", "\\|")
            rows.append(f"| `{key}` | {kind} | `{default}` | {f.metadata.get('help', '')} |")
        if rows:
            lines.extend(
                [
                    f"## {prefix.rstrip('.') or 'top level'}",
                    "",
                    "| key | type | default | meaning |",
                    "|---|---|---|---|",
                    *rows,
                    "",
                ]
            )

    walk(Config, "")
    return "\n".join(lines)
