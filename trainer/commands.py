"""Training commands: train, show-config, config-reference. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse

from common.commands import Command, quiet_libraries, rank


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML file (see configs/)")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-5 train.steps=200"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--skip-memory-check",
        action="store_true",
        help="train even when the memory plan says it will not fit (same as memory.check=false)",
    )


def train(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.signals import follow_launcher

    follow_launcher()  # before the slow part: a launcher killed while we load must not leave us behind
    overrides = [*args.overrides, *(["memory.check=false"] if args.skip_memory_check else [])]
    # validated before anything heavy is imported or loaded
    cfg = load_config(args.config, overrides)
    quiet_libraries()
    from trainer.recipe import run

    result = run(cfg, show_progress=not args.no_progress)
    if rank() == 0:
        print(f"LoRA written to {result.lora_path}")
    return 0


def _add_show_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")


def show_config(args: argparse.Namespace) -> int:
    from trainer.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def config_reference(args: argparse.Namespace) -> int:
    from trainer.config import config_reference as reference

    print(reference())
    return 0


def _add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file (see configs/)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. train.resolution=768 model.quantize=nf4",
    )
    p.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GIB",
        help="GiB per GPU to plan for (default: memory.gpu_memory, else the detected GPU)",
    )
    p.add_argument(
        "--ram",
        type=float,
        metavar="GIB",
        help="GiB of host RAM (default: memory.ram, else this machine's)",
    )
    p.add_argument(
        "--gpus",
        type=int,
        help="GPUs (processes) the run uses; with train.sharding: fsdp each holds 1/N "
        "(default: WORLD_SIZE, else memory.gpus, else 1)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the plan as JSON (peak_gpu_gib, peak_ram_gib, phases)",
    )
    p.add_argument(
        "--table",
        action="store_true",
        help="print docs/memory.md's table (every family x quantisation x "
        "checkpointing x resolution) instead",
    )


def plan(args: argparse.Namespace) -> int:
    """Exit status 0 when the config fits, 1 when it does not."""
    import json
    import math
    import os

    from common.errors import UserError

    for flag, value in (
        ("--gpu-memory", args.gpu_memory),
        ("--ram", args.ram),
        ("--gpus", args.gpus),
    ):
        if value is not None and (value <= 0 or not math.isfinite(value)):
            raise UserError(f"{flag} must be a positive number, got {value:g}")
    if args.table:
        from trainer.memory_table import memory_table

        quiet_libraries()
        print(memory_table())
        return 0
    if not args.config:
        raise UserError("plan needs --config FILE (or --table)")
    from trainer.config import load_config

    cfg = load_config(args.config, args.overrides)
    quiet_libraries()
    import torch

    from trainer.memory import (
        ModelCounts,
        cheapest_fix,
        plan_training,
        planned_for,
        render,
        verdict,
    )
    from trainer.preflight import preflight

    # the model's own checks; this machine's packages and devices are not what is planned
    base = preflight(cfg, data=False, machine=False).base
    gpus = args.gpus or int(os.environ.get("WORLD_SIZE", "0")) or cfg.memory.gpus or 1
    gpu, ram = planned_for(
        cfg, "cuda" if torch.cuda.is_available() else "cpu", args.gpu_memory, args.ram
    )
    # a GPU run when a GPU is given or here, else the CPU run this machine would make (all of it in RAM)
    on_gpu, counts = gpu is not None, ModelCounts(base)
    result = plan_training(cfg, base, gpus, gpu, ram, on_gpu=on_gpu, counts=counts)
    fix = (
        None
        if result.fits()
        else cheapest_fix(cfg, base, gpus, gpu, ram, on_gpu=on_gpu, counts=counts)
    )
    if args.json:
        print(json.dumps({**result.to_json(), "verdict": verdict(result, fix)}, indent=2))
    else:
        print(render(result))
        print(verdict(result, fix))
    return 0 if result.fits() else 1


def _add_rehearse_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", required=True, help="a preset (its model.path must be a known FLUX.2 size)"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. train.resolution=256 model.quantize=int8",
    )
    p.add_argument("--steps", type=int, default=2, help="training steps to rehearse")
    p.add_argument(
        "--layers",
        metavar="DOUBLE,SINGLE",
        help="keep the real widths, cut the depth to this many "
        "blocks (the text encoder in proportion)",
    )
    p.add_argument(
        "--model-dir",
        metavar="DIR",
        help="write the random model here and keep it (reused when it is "
        "there); default: a temporary folder",
    )
    p.add_argument(
        "--json", dest="json_path", metavar="FILE", help="also write the measurements as JSON"
    )
    p.add_argument(
        "--images",
        type=int,
        default=12,
        help="images in the drawn sample set, when the preset's data.path is not a folder",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def rehearse(args: argparse.Namespace) -> int:
    """Exit status 0 when every phase stayed within 10 % of its plan and every LoRA reloaded whole, else 1."""
    from trainer.rehearse import Options, parse_layers
    from trainer.rehearse import rehearse as run_rehearsal

    opts = Options(
        args.config,
        args.overrides,
        args.steps,
        parse_layers(args.layers),
        args.model_dir,
        args.json_path,
        not args.no_progress,
        args.images,
    )
    quiet_libraries()
    return run_rehearsal(opts)


COMMANDS = {
    "train": Command(add_train_arguments, train),
    "show-config": Command(_add_show_config_arguments, show_config),
    "config-reference": Command(lambda p: None, config_reference),
    "plan": Command(_add_plan_arguments, plan),
    "rehearse": Command(_add_rehearse_arguments, rehearse),
}
