"""`flux2-lora evaluate`: the CLI face of evaluation.evaluate."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.commands import Command, quiet_libraries
from common.errors import UserError


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: diffusers folder or hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--lora", action="append", help="a LoRA file or run folder (repeatable); named by its run folder")
    src.add_argument("--run", help="a training output.dir: evaluates every checkpoint and the final LoRA")
    p.add_argument("--suite", default="product", help="suite YAML file, or character | style | product | edit")
    p.add_argument("--scales", default="0,0.5,1.0", help="comma-separated LoRA scales")
    p.add_argument("--seeds", type=int, default=3, help="seeds per prompt")
    p.add_argument("--references", help="training images (folder, zip, datasets folder or prepared DIR)")
    p.add_argument("--encoder", help="local vision model for reference similarity (CLIP, SigLIP, DINOv2)")
    p.add_argument("--trigger", help="default: the LoRA's own trigger word")
    p.add_argument("--steps", type=int, help="denoising steps (default: the family's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the family's)")
    p.add_argument("--width", type=int, default=512, help="render width")
    p.add_argument("--height", type=int, default=512, help="render height")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--out", required=True, help="new folder for report.html, metrics and images")


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--scales '{text}' must be comma-separated numbers, e.g. 0,0.5,1.0") from None
    if not scales or any(s < 0 for s in scales):
        raise UserError(f"--scales '{text}' must be one or more numbers >= 0")
    return sorted(set(scales))


def evaluate(args: argparse.Namespace) -> int:
    quiet_libraries()
    from evaluation.evaluate import adapters_from_files, adapters_from_run
    from evaluation.evaluate import evaluate as run_evaluation
    from evaluation.suites import load_suite

    suite = load_suite(args.suite)
    scales = parse_scales(args.scales)
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    adapters = adapters_from_run(args.run) if args.run else adapters_from_files(args.lora)
    result = run_evaluation(args.model, adapters, suite, args.out, scales=scales, seeds=args.seeds, references=args.references,
                      encoder=args.encoder, trigger=args.trigger, steps=args.steps, width=args.width,
                      height=args.height, guidance=args.guidance, show_progress=not args.no_progress)
    rec = result["recommendation"]
    print(f"evaluated {len(adapters)} adapter(s) x {len(scales)} scale(s) x {args.seeds} seed(s) on suite "
          f"'{suite.name}'; report: {Path(args.out) / 'report.html'}"
          + (f"; recommended: {rec['adapter']} at scale {rec['scale']:g}" if rec else ""))
    return 0


COMMANDS = {"evaluate": Command(_add_arguments, evaluate)}
