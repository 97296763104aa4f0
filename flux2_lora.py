"""`flux2-lora`: a thin table of subcommands. Each lives in its package's commands.py, beside the code it drives;
only the chosen one is imported, so `flux2-lora sample-data` does not pay for torch and diffusers."""

from __future__ import annotations

import argparse
import importlib
import sys

from common.commands import HelpFormatter, silence_known_noise
from common.errors import run_guarded

# name -> (module holding it in COMMANDS, one-line help)
TABLE = {
    "train": ("trainer.commands", "train a LoRA (same as `accelerate launch train.py`)"),
    "show-config": ("trainer.commands", "print the resolved, validated training config"),
    "plan": (
        "trainer.commands",
        "plan GPU memory and RAM of a training config, phase by phase, before any download",
    ),
    "rehearse": (
        "trainer.commands",
        "run a preset at the real model's width on random weights, each phase measured against its plan",
    ),
    "config-reference": (
        "trainer.commands",
        "print every config key with type, default and meaning (Markdown)",
    ),
    "sample-data": (
        "data_tools.commands",
        "write a small synthetic captioned dataset (a brand mark)",
    ),
    "prepare": (
        "data_tools.commands",
        "check, fix, caption and bucket an image set (writes report.html)",
    ),
    "tiny-model": (
        "inference.commands",
        "write a tiny random FLUX.2 (diffusers folder) for tests and the quickstart",
    ),
    "generate": ("inference.commands", "generate or edit images with a base model and LoRAs"),
    "export": (
        "inference.commands",
        "write a LoRA in the layout ComfyUI, kohya/musubi-tuner or ai-toolkit reads",
    ),
    "evaluate": (
        "evaluation.commands",
        "compare checkpoints, scales and adapters with numbers and pictures",
    ),
}


def command(name: str):
    return importlib.import_module(TABLE[name][0]).COMMANDS[name]


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flux2-lora", description="Train, use and evaluate FLUX.2 LoRA adapters."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_module, help_text) in TABLE.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=HelpFormatter
        )
        if name == chosen:
            cmd = command(name)
            cmd.add_arguments(p)
            p.set_defaults(_run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    silence_known_noise()
    args = build_parser(argv).parse_args(argv)
    return run_guarded(lambda: args._run(args))


if __name__ == "__main__":
    sys.exit(main())
