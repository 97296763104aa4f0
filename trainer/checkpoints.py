"""Checkpoints: accelerate state + LoRA weights under output.dir/checkpoints/step-N, written atomically.

Every rank calls `save`, because accelerate writes one RNG file per process; rank 0 alone renames the
finished temporary folder into place, so a checkpoint folder is either complete or absent. The folder layout
itself is inference/runs.py's (evaluate and generate read the same folders).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from common.atomic import fsync_dir, fsync_tree
from common.configtree import non_negative, option, positive
from common.errors import UserError
from inference.lora_io import WEIGHT_NAME, load_state, save_lora
from inference.runs import CHECKPOINTS, STATE_FILE, checkpoint_dir, list_checkpoints


@dataclasses.dataclass
class CheckpointConfig:
    every: int = option(0, check=non_negative, help="save every N steps; 0 saves only on signals")
    keep_last: int = option(3, check=positive, help="older checkpoints are deleted")


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(
                f"resume: latest, but '{Path(output_dir) / CHECKPOINTS}' holds no checkpoint; "
                "remove resume to start fresh"
            )
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(
            f"resume: '{resume}' is not a checkpoint folder (no {STATE_FILE}); use latest or a step-N folder"
        )
    return path


def register_lora_hooks(
    accelerator, family, lora_info: Callable[[], dict], transformer, optimizer, shards
) -> None:
    """accelerate's save_state/load_state then write and read the LoRA alone (safetensors), never the frozen base.
    A sharded run's model and optimizer are not accelerate's (it would wrap them in DDP): the hooks gather their
    state whole on every rank and rank 0 writes it; resuming hands each rank its shard again."""
    from peft import set_peft_model_state_dict

    from trainer import sharding

    def save_hook(models, weights, output_dir):
        model = accelerator.unwrap_model(transformer)
        layers = shards.lora_state(model)
        if accelerator.is_main_process:
            # unbaked: resume must read back exactly the weights it trains (evaluate reads alpha from the metadata)
            save_lora(
                Path(output_dir) / WEIGHT_NAME,
                model,
                family,
                lora_info(),
                bake_alpha=False,
                layers=layers,
            )
        if shards.enabled:
            sharding.save_optimizer(model, optimizer, Path(output_dir), accelerator.is_main_process)
        weights.clear()

    def load_hook(models, input_dir):
        model = accelerator.unwrap_model(transformer)
        state = {
            k.removeprefix("transformer."): v
            for k, v in load_state(Path(input_dir) / WEIGHT_NAME).items()
        }
        if shards.enabled:
            sharding.load_full_lora_state(model, state)
            sharding.load_optimizer(model, optimizer, Path(input_dir))
        else:
            result = set_peft_model_state_dict(model, state)
            if result.unexpected_keys:
                raise UserError(
                    f"checkpoint '{input_dir}' holds a LoRA of another shape; resume it with its own "
                    "lora settings"
                )
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load(accelerator, checkpoint: Path) -> int:
    """Restore LoRA, optimizer, scheduler and RNG state; returns the step to continue from."""
    try:
        accelerator.load_state(str(checkpoint))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(
            f"checkpoint '{checkpoint}' does not fit this config ({str(exc).splitlines()[0][:160]}); "
            "resume with the config it was saved with"
        ) from None
    return json.loads((checkpoint / STATE_FILE).read_text())["step"]


def save(accelerator, output_dir: Path, step: int, keep_last: int) -> Path:
    final = checkpoint_dir(output_dir, step)
    root = final.parent
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}))
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
