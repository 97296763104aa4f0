"""Sharded data parallel (FSDP2, torch's `fully_shard`): each of N ranks keeps 1/N of the frozen transformer.

Data parallel replicates the whole transformer on every GPU, and dev's 32B do not fit one card in bf16. Sharded,
each transformer block (and the rest of the model) is split across the ranks and gathered one block at a time for
its forward and backward; the LoRA is sharded alongside and its gradients reduce-scattered.

One code path for GPUs (NCCL) and CPU processes (gloo), so the 2-process CPU test runs what a multi-GPU run does.
accelerate's FSDP plugin does not wrap the model here: on CPU it silently falls back to plain data parallel, so a
plugin-wrapped path would be one nobody could run before a user's first GPU job. An accelerate config that
selects FSDP (`distributed_type: FSDP`, which `accelerate launch` passes on as ACCELERATE_USE_FSDP) turns sharding
on exactly as `train.sharding: fsdp` does; either way a run that asked for sharding is sharded or refused.

Collectives (`full_tensor`, the optimizer state gathers) are called on every rank; rank 0 alone writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from common.errors import UserError

log = logging.getLogger("flux2_lora.train")

# the gathered optimizer state of a sharded run's checkpoint
OPTIMIZER_FILE = "optimizer_full.safetensors"


@dataclasses.dataclass(frozen=True)
class Sharding:
    """Whether this run shards the transformer over its processes (FSDP2), decided once from train.sharding and
    the launch (decide) and asked wherever it matters: loading, DDP wrapping, samples, checkpoints, the save."""

    enabled: bool

    def apply(self, transformer: torch.nn.Module, accelerator) -> None:
        """Shard the transformer (before its parameters are listed: sharding replaces them) and log the shares."""
        if not self.enabled:
            return
        shard(transformer, accelerator.device)
        shares = accelerator.gather(
            torch.tensor([local_share(transformer)], device=accelerator.device)
        )
        log.info(
            "sharded over %d ranks; the ranks hold %s of the frozen weights",
            accelerator.num_processes,
            ", ".join(f"{100 * s:.1f}%" for s in shares.tolist()),
        )

    def lora_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole LoRA gathered on every rank (a collective) when sharded; None when each rank holds it whole."""
        return full_lora_state(model) if self.enabled else None


def decide(cfg, accelerator) -> Sharding:
    return Sharding(requested(cfg.train.sharding, accelerator))


def requested(setting: str, accelerator) -> bool:
    """train.sharding, or an accelerate config that selected FSDP (its plugin would fall back silently on CPU)."""
    from accelerate.utils import DistributedType

    return (
        setting == "fsdp"
        or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
        or accelerator.distributed_type == DistributedType.FSDP
    )


def sharding_problem(accelerator, cfg) -> str | None:
    """Why this run cannot shard (checked before any weights load), or None."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes < 2 and launched > 1:
        return (
            f"train.sharding: fsdp, but the {launched} launched processes did not join one distributed group "
            "(accelerate does that without GPUs); on CPUs launch with `ACCELERATE_USE_CPU=true torchrun "
            f"--nproc_per_node {launched} train.py ...`"
        )
    if accelerator.num_processes < 2:
        return (
            "train.sharding: fsdp needs 2 or more processes and this run has 1; launch it with "
            "`accelerate launch --config_file configs/accelerate/fsdp.yaml train.py ...` (or torchrun "
            "--nproc_per_node N), or set train.sharding: none"
        )
    return sharding_conflict(cfg)


def sharding_conflict(cfg) -> str | None:
    """A setting sharded training does not take yet, or None: the one rule, asked by the config check (with
    train.sharding: fsdp), by a run an accelerate FSDP config made sharded, and by the planner's fixes."""
    for key, value in (
        ("model.group_offload", cfg.model.group_offload != "none"),
        ("model.quantize", cfg.model.quantize != "none"),
        ("ema.decay", bool(cfg.ema.decay)),
        ("train.mixed_precision: fp16", cfg.train.mixed_precision == "fp16"),
    ):
        if value:
            return f"train.sharding: fsdp cannot be combined with {key} yet; remove one of them"
    return None


def shard(transformer: torch.nn.Module, device: torch.device) -> None:
    """fully_shard each transformer block, then the root (embedders, modulations, final layer)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    block_types = set(getattr(transformer, "_no_split_modules", None) or ())
    blocks = [m for m in transformer.modules() if type(m).__name__ in block_types]
    if not blocks:
        raise RuntimeError(
            f"{type(transformer).__name__} names no blocks to shard (_no_split_modules)"
        )
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(transformer, mesh=mesh)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_share(model: torch.nn.Module) -> float:
    """The share of the frozen weights this rank holds, measured from the tensors it actually stores."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        if isinstance(p, DTensor):
            local += p.to_local().numel()
        else:
            local += p.numel()
        total += p.numel()
    return local / max(total, 1)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a sharded one (a collective: every rank calls it); plain tensors pass through."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's LoRA state dict with whole tensors on every rank (collective)."""
    from peft.utils import get_peft_model_state_dict

    return {
        k: full(v).detach().to("cpu").contiguous()
        for k, v in get_peft_model_state_dict(model).items()
    }


def load_full_lora_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Whole LoRA tensors (as saved, without peft's adapter name) into a sharded model: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    names = {n.replace(".default", ""): n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(names) - set(state))
    if missing or len(state) != len(names):
        raise UserError(
            f"the checkpoint's LoRA does not fit this config ({len(missing)} tensors missing, e.g. "
            f"{missing[:1]}); resume with the config it was saved with"
        )
    set_model_state_dict(
        model,
        {names[k]: v for k, v in state.items()},
        options=StateDictOptions(full_state_dict=True, strict=False),
    )


def save_optimizer(model, optimizer, folder: Path, main: bool) -> None:
    """The optimizer state gathered whole (collective), written by rank 0 as safetensors + JSON metadata."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    state = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True)
    )
    if not main:
        return
    tensors, scalars = {}, {}
    for name, slots in state["state"].items():
        for slot, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{name}\t{slot}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{name}\t{slot}"] = value
    meta = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    save_file(tensors, str(folder / OPTIMIZER_FILE), metadata=meta)


def load_optimizer(model, optimizer, folder: Path) -> None:
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    path = folder / OPTIMIZER_FILE
    if not path.is_file():
        raise UserError(
            f"checkpoint '{folder}' was not saved by a sharded run (no {OPTIMIZER_FILE}); resume it "
            "with the sharding it was trained with"
        )
    state: dict = {}
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        for key in fh.keys():
            name, slot = key.split("\t")
            state.setdefault(name, {})[slot] = fh.get_tensor(key)
    for key, value in json.loads(meta["scalars"]).items():
        name, slot = key.split("\t")
        state.setdefault(name, {})[slot] = value
    set_optimizer_state_dict(
        model,
        optimizer,
        {"state": state, "param_groups": json.loads(meta["param_groups"])},
        options=StateDictOptions(full_state_dict=True),
    )
