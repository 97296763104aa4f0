"""`flux2-lora evaluate`: the CLI face of evaluation.evaluate."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from common.commands import Command, quiet_libraries
from common.configtree import add_flags, from_args
from common.errors import UserError
from evaluation.report import recommendation_text


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from evaluation.evaluate import EvaluateOptions

    p.add_argument("--model", required=True, help="base model: diffusers folder or hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--lora",
        action="append",
        help="a LoRA file or run folder (repeatable); named by its run folder",
    )
    src.add_argument(
        "--run", help="a training output.dir: evaluates every checkpoint and the final LoRA"
    )
    p.add_argument(
        "--suite",
        default="product",
        help="suite YAML file, or character | style | product | edit | quickstart",
    )
    p.add_argument(
        "--scales", default="0,0.5,1.0", help="comma-separated LoRA scales (0 = the base model)"
    )
    add_flags(p, EvaluateOptions, skip=("scales",))
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--out", required=True, help="new folder for report.html, metrics and images")


def parse_scales(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(
            f"--scales '{text}' must be comma-separated numbers, e.g. 0,0.5,1.0"
        ) from None


def evaluate(args: argparse.Namespace) -> int:
    from evaluation.evaluate import EvaluateOptions

    opts = from_args(EvaluateOptions, args, scales=parse_scales(args.scales))
    quiet_libraries()
    from evaluation.evaluate import adapters_from_files, adapters_from_run
    from evaluation.evaluate import evaluate as run_evaluation
    from evaluation.suites import load_suite

    suite = load_suite(args.suite)
    adapters = adapters_from_run(args.run) if args.run else adapters_from_files(args.lora)
    result = run_evaluation(
        args.model,
        adapters,
        suite,
        args.out,
        show_progress=not args.no_progress,
        **dataclasses.asdict(opts),
    )
    rec, speed = result["recommendation"], result["speed"]
    print(
        f"evaluated {len(adapters)} adapter(s) x {len(opts.scales)} scale(s) x {opts.seeds} seed(s) on suite "
        f"'{suite.name}': {speed['renders']} renders at {speed['renders_per_second']:.2f}/s; "
        f"report: {Path(args.out) / 'report.html'}" + f"; {recommendation_text(rec)}"
    )
    return 0


COMMANDS = {"evaluate": Command(_add_arguments, evaluate)}
