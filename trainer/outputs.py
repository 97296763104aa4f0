"""The run folder: refusing to clobber another run, the tracker check, the model card."""

from __future__ import annotations

import dataclasses
import netrc
import os
import shutil
from pathlib import Path
from typing import Literal

from common.atomic import write_text
from common.configtree import option
from common.errors import UserError
from inference.lora_io import WEIGHT_NAME
from inference.runs import CARD_FILE, RUN_MARKERS


@dataclasses.dataclass
class OutputConfig:
    dir: str = option(
        "runs/lora", help="the run folder: LoRA, model card, config, checkpoints, logs"
    )
    overwrite: bool = option(False, help="replace a finished or abandoned run in output.dir")
    report_to: Literal["none", "wandb", "tensorboard"] = option(
        "none", help="tracker for loss and lr (WANDB_MODE=offline works)"
    )
    project: str = option("flux2-lora", help="wandb/tensorboard project name")
    name: str | None = option(None, help="LoRA name in the model card; defaults to the folder name")
    export: list[Literal["comfyui", "kohya", "bfl"]] = option(
        factory=list,
        help="also write the final LoRA in these layouts, as pytorch_lora_weights_<layout>.safetensors "
        "(comfyui: ComfyUI; kohya: musubi-tuner / kohya; bfl: ai-toolkit)",
    )

    def validate(self) -> list[str]:
        return [] if self.dir else ["output.dir is empty; set it to a folder for this run"]


def tracker_problem(cfg: OutputConfig) -> str | None:
    """wandb without a login fails after minutes of caching; say so before anything loads."""
    if cfg.report_to != "wandb":
        return None
    if os.environ.get("WANDB_MODE", "").lower() in (
        "offline",
        "disabled",
        "dryrun",
    ) or os.environ.get("WANDB_API_KEY"):
        return None
    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    if logged_in:
        return None
    return (
        "output.report_to: wandb, but wandb has no login here; run `wandb login`, or set "
        "WANDB_MODE=offline (logs stay in output.dir), or add output.report_to=none to the command"
    )


def prepare_output_dir(cfg: OutputConfig, resuming: bool) -> Path:
    """Create output.dir, checking it is writable and holds no other run (unless resuming or overwriting)."""
    out = Path(cfg.dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output.dir '{out}' is a file; choose a folder path")
    taken = [m for m in RUN_MARKERS if (out / m).exists()]
    if taken and not resuming:
        if not cfg.overwrite:
            raise UserError(
                f"output.dir '{out}' already holds a run ({', '.join(taken)}); set resume: latest to continue "
                "it, output.overwrite: true to replace it, or choose another output.dir"
            )
        for marker in taken:
            target = out / marker
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"output.dir '{out}' is not writable ({exc.strerror}); choose a folder you can write to"
        ) from None
    return out


def export_copies(out: Path, formats: list[str], model: str) -> list[Path]:
    """output.export: the final LoRA in each layout; `model`, the run's base (a DoRA export reads its weights)."""
    from inference.export import export_lora

    written = []
    for fmt in formats:
        target = out / f"pytorch_lora_weights_{fmt}.safetensors"
        export_lora(out / WEIGHT_NAME, fmt, target, model=model)
        written.append(target)
    return written


def card_base_model(base, variant) -> str:
    """What the card names as base: a hub id names the exact checkpoint (klein base and distilled share sizes);
    a local folder is named by the known variant its size matches."""
    return variant.hub_id(base.distilled) if base.is_local else base.path


def model_card(
    *,
    name: str,
    variant,
    family,
    base_model: str,
    load_from: str,
    trigger: str | None,
    rank: int,
    alpha: float,
    steps: int,
    dataset_size: int,
    resolution: str,
    targets: str,
) -> str:
    """The run's README.md. `base_model` names the checkpoint (the hub's metadata field); `load_from` is the folder
    or hub id the run loaded, so the snippet runs as written where the run did."""
    trigger_line = (
        f"Use the trigger word **`{trigger}`** in prompts."
        if trigger
        else "No trigger word was set."
    )
    pipeline = family.pipeline_class_name
    return f"""---
license: {variant.licence}
base_model: {base_model}
library_name: diffusers
tags: [flux2, lora, text-to-image, flux2-lora]
---
# {name}

A LoRA for {variant.name}, trained with flux2-lora.

{trigger_line}

| | |
|---|---|
| base model | {base_model} |
| family | {family.name} |
| rank / alpha | {rank} / {alpha:g} |
| targets | {targets} |
| steps | {steps} |
| images | {dataset_size} |
| resolution | {resolution} |
| licence | {variant.licence} (inherited from the base model) |

```python
import torch
from diffusers import {pipeline}
pipe = {pipeline}.from_pretrained("{load_from}", torch_dtype=torch.bfloat16)
pipe.load_lora_weights("path/to/this/folder", weight_name="{WEIGHT_NAME}")
```
"""


def write_card(out: Path, text: str) -> None:
    write_text(out / CARD_FILE, text)
