"""`flux2-lora evaluate`: the CLI face of inference.evaluate."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_tools.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: diffusers folder or hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--lora", action="append", help="a LoRA file (repeatable)")
    src.add_argument("--run", help="a training output.dir: evaluates every checkpoint and the final LoRA")
    p.add_argument("--suite", default="product", help="suite YAML file, or character | style | product | edit")
    p.add_argument("--scales", default="0,0.5,1.0", help="comma-separated LoRA scales")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--references", help="training images (folder, zip, datasets folder or prepared DIR)")
    p.add_argument("--encoder", help="local vision model for reference similarity (CLIP, SigLIP, DINOv2)")
    p.add_argument("--trigger", help="default: the LoRA's own trigger word")
    p.add_argument("--steps", type=int, help="denoising steps (default: the family's)")
    p.add_argument("--guidance", type=float)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True)


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--scales '{text}' must be comma-separated numbers, e.g. 0,0.5,1.0") from None
    if not scales or any(s < 0 for s in scales):
        raise UserError(f"--scales '{text}' must be one or more numbers >= 0")
    return sorted(set(scales))


def run(args: argparse.Namespace) -> int:
    from inference.evaluate import Adapter, adapters_from_run, evaluate
    from inference.suites import load_suite

    suite = load_suite(args.suite)
    scales = parse_scales(args.scales)
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    adapters = adapters_from_run(args.run) if args.run else [Adapter(Path(p).stem, Path(p)) for p in args.lora]
    result = evaluate(args.model, adapters, suite, args.out, scales=scales, seeds=args.seeds, references=args.references,
                      encoder=args.encoder, trigger=args.trigger, steps=args.steps, width=args.width,
                      height=args.height, guidance=args.guidance, show_progress=not args.no_progress)
    rec = result["recommendation"]
    print(f"evaluated {len(adapters)} adapter(s) x {len(scales)} scale(s) x {args.seeds} seed(s) on suite "
          f"'{suite.name}'; report: {Path(args.out) / 'report.html'}"
          + (f"; recommended: {rec['adapter']} at scale {rec['scale']:g}" if rec else ""))
    return 0
