"""`flux2-lora` command line: one entry point, one subcommand per job. User mistakes exit 2 with one line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from data_tools.errors import UserError


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.recipe import run

    cfg = load_config(args.config, args.overrides)  # validated before anything heavy is imported or loaded
    _quiet_libraries()
    result = run(cfg, show_progress=not args.no_progress)
    print(f"LoRA written to {result.lora_path}")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from inference.tiny import write_tiny_model

    path = write_tiny_model(args.dir, args.family, seed=args.seed, distilled=args.distilled)
    print(f"tiny {args.family} model written to {path}")
    return 0


def cmd_sample_data(args: argparse.Namespace) -> int:
    from data_tools.sample_data import write_sample_data

    path = write_sample_data(args.dir, count=args.count, trigger=args.trigger)
    print(f"{args.count} captioned images written to {path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from data_tools.prepare import PrepareOptions, prepare

    opts = PrepareOptions(trigger=args.trigger, class_word=args.class_word, resolution=args.resolution, fix=args.fix,
                          captioner=args.captioner, workers=args.workers, recursive=args.recursive,
                          background=args.background, max_pixels=args.max_pixels, batch_size=args.batch_size,
                          replace_class=args.replace_class, dedupe_tags=args.dedupe_tags)
    report = prepare(args.src, args.out, opts, show_progress=not args.no_progress)
    s = report["summary"]
    print(f"{s['kept']} of {s['files']} images prepared in {args.out} ({s['errors']} errors, {s['warnings']} warnings, "
          f"{s['infos']} notes); open {Path(args.out) / 'report.html'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from inference import cli_evaluate

    return cli_evaluate.run(args)


def cmd_generate(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from inference import cli_generate

    return cli_generate.run(args)


def cmd_config_reference(args: argparse.Namespace) -> int:
    from trainer.config import config_reference

    print(config_reference())
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    from trainer.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-5 train.steps=200")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2-lora", description="Train and use FLUX.2 LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA (same as `accelerate launch train.py`)")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tiny-model", help="write a tiny random FLUX.2 (diffusers folder) for tests and the quickstart")
    p.add_argument("dir")
    p.add_argument("--family", choices=["dev", "klein"], required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distilled", action="store_true", help="klein only: mark the model step-distilled")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("sample-data", help="write a small synthetic captioned dataset (a brand mark)")
    p.add_argument("dir")
    p.add_argument("--count", type=int, default=12)
    p.add_argument("--trigger", default="zxq")
    p.set_defaults(func=cmd_sample_data)

    p = sub.add_parser("prepare", help="check, fix, caption and bucket an image set (writes report.html)")
    p.add_argument("src", help="a folder, a .zip, or a datasets folder (save_to_disk)")
    p.add_argument("--out", required=True, help="new folder for the prepared dataset (the source is never changed)")
    p.add_argument("--trigger")
    p.add_argument("--class-word", help="for template captions: '{trigger} {class word}'")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--fix", action="store_true", help="write upright RGB images cropped to their bucket, drop exact "
                   "duplicates, normalise captions")
    p.add_argument("--captioner", default="template", help="template, or vlm:PATH (a local image-to-text model)")
    p.add_argument("--workers", type=int, default=1, help="processes that decode and check images")
    p.add_argument("--recursive", action="store_true")
    p.add_argument("--background", default="#FFFFFF", help="colour transparent images are composited on")
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse larger images (decompression bombs)")
    p.add_argument("--batch-size", type=int, default=1, help="merge buckets holding fewer images than this")
    p.add_argument("--replace-class", metavar="WORD=REPLACEMENT", help="with --fix: e.g. man='ohwx man' in every caption")
    p.add_argument("--dedupe-tags", action="store_true", help="with --fix: drop repeated comma-separated tags")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("generate", help="generate or edit images with a base model and LoRAs")
    from inference.cli_generate import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="compare checkpoints, scales and adapters with numbers and pictures")
    from inference.cli_evaluate import add_arguments as add_evaluate_arguments

    add_evaluate_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("show-config", help="print the resolved, validated training config")
    p.add_argument("--config", help="YAML file")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_show_config)

    p = sub.add_parser("config-reference", help="print every config key with type, default and meaning (Markdown)")
    p.set_defaults(func=cmd_config_reference)
    return parser


def run_guarded(func: Callable[[], int]) -> int:
    """Run a command: UserError -> one line on stderr, exit 2; interrupted training -> its own code."""
    from trainer.recipe import TrainingInterrupted

    try:
        return func()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
