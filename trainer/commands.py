"""Training commands: train, show-config, config-reference. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse

from common.commands import Command, quiet_libraries, rank


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-5 train.steps=200")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def train(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.signals import follow_launcher

    follow_launcher()  # before the slow part: a launcher killed while we load must not leave us behind
    cfg = load_config(args.config, args.overrides)  # validated before anything heavy is imported or loaded
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


COMMANDS = {
    "train": Command(add_train_arguments, train),
    "show-config": Command(_add_show_config_arguments, show_config),
    "config-reference": Command(lambda p: None, config_reference),
}
