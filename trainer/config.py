"""The training config tree: defaults <- YAML <- dotted overrides, validated once before any weights load.

Each section is defined next to the code that reads it; this file only assembles them. The key paths
model.path, model.family, data.path, data.trigger, train.steps, train.batch_size, train.resolution,
train.seed, optim.lr, lora.rank, lora.alpha, output.dir, checkpoint.every and resume are a public contract.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import yaml

from common.commands import rank
from common.configtree import (
    apply_overrides,
    from_dict,
    option,
    read_yaml,
    to_dict,
    type_name,
)
from data_tools.dataset import DataConfig
from inference.adapter_kinds import quantize_problem
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
from trainer.sharding import sharding_conflict
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
        problems = []
        family = FAMILIES.get(self.model.family)
        if family is not None and not family.has_guidance_embedding and self.train.guidance != 1.0:
            problems.append(
                f"train.guidance is set, but FLUX.2 {family.name} has no guidance embedding; remove it"
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
        if problem := quantize_problem(self.lora.kind, self.model.quantize):
            problems.append(problem)
        if self.train.sharding == "fsdp" and (conflict := sharding_conflict(self)):
            problems.append(conflict)
        for fmt in self.output.export:
            if problem := self.lora.kind.export_problem(fmt):
                problems.append(f"output.export: {problem}")
        return problems


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    data = read_yaml(path) if path else {}
    apply_overrides(data, list(overrides))
    cfg = from_dict(Config, data)
    if (note := fit_to_steps(cfg)) and rank() == 0:
        print(f"warning: {note}", file=sys.stderr)
    return cfg


def fit_to_steps(cfg: Config) -> str | None:
    """A run shorter than the preset's intervals (a smoke test: train.steps=10) runs, as other trainers let it:
    warmup is cut to a tenth of the run and intervals beyond the run are skipped (the values written to
    output.dir/config.yaml say so). Returns the one-line note of what changed, or None."""
    steps, changed = cfg.train.steps, []
    if cfg.optim.warmup_steps >= steps:
        changed.append(f"optim.warmup_steps {cfg.optim.warmup_steps} -> {steps // 10}")
        cfg.optim.warmup_steps = steps // 10
    skipped = []
    for section, name in (
        ("sample", "sample.every"),
        ("validation", "validation.every"),
        ("checkpoint", "checkpoint.every"),
    ):
        every = getattr(cfg, section).every
        if every > steps:
            skipped.append(f"{name} {every}")
            getattr(cfg, section).every = 0
    if skipped:
        changed.append(
            f"{' and '.join(skipped)} beyond the run -> 0 (at the end / on signals only)"
        )
    if not changed:
        return None
    return f"train.steps={steps} is a short run: {'; '.join(changed)}"


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
