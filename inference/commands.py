"""Model-layer commands: `generate` (prompts or a JSONL of jobs -> PNGs with provenance, results.jsonl, a grid)
and `tiny-model`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from common.atomic import atomic_path, write_text
from common.commands import Command, quiet_libraries
from common.configtree import add_flags, from_args, from_dict, option
from common.errors import UserError
from inference.families import FAMILIES
from inference.generate import GeneratorOptions, Request, scale_problem
from inference.grids import make_grid
from inference.provenance import save_png


def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: diffusers folder or hub id")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a LoRA file or run folder, optionally with its scale (default 1); repeatable",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument(
        "--prompts",
        metavar="FILE.jsonl",
        help="one job per line: prompt, seed, width, height, "
        "steps, guidance, image, references, num_images",
    )
    p.add_argument("--image", help="edit: the image to change")
    p.add_argument(
        "--ref", action="append", default=[], help="reference image (repeatable, priority order)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the first image; image i uses seed + i"
    )
    p.add_argument(
        "--steps",
        type=int,
        help="denoising steps (default: the family's: 50, or 4 for distilled klein)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        help="guidance scale (default: the family's: 4, or 1 for distilled klein)",
    )
    p.add_argument("--width", type=int, help="default: the edit image's width, else 1024")
    p.add_argument("--height", type=int, help="default: the edit image's height, else 1024")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument(
        "--add-trigger", action="store_true", help="put each LoRA's trigger word in the prompt"
    )
    p.add_argument(
        "--fuse", action="store_true", help="fuse the LoRAs into the base weights (faster steps)"
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="load a LoRA even if some of its modules match "
        "nothing in the model (otherwise an error)",
    )
    add_flags(p, GeneratorOptions)
    p.add_argument("--out", required=True, help="folder for the PNGs, results.jsonl and grid.png")


def parse_lora(spec: str) -> tuple[str, float]:
    """'a.safetensors:0.8' -> (path, 0.8); a spec whose tail after ':' is not a number is an error unless the
    whole spec is an existing path."""
    path, _, scale = spec.rpartition(":")
    if not path or Path(spec).exists():
        return spec, 1.0
    try:
        value = float(scale)
    except ValueError:
        raise UserError(
            f"--lora '{spec}': the scale '{scale}' is not a number; write FILE:0.8, or FILE alone "
            "for scale 1"
        ) from None
    if problem := scale_problem(value):
        raise UserError(f"--lora '{spec}': the scale {problem}")
    return path, value


def _grid_label(record: dict[str, Any]) -> str:
    loras = ", ".join(f"{lora['name']} x{lora['scale']:g}" for lora in record["loras"])
    return f"{record['prompt']}\nseed {record['seed']}" + (f" · {loras}" if loras else "")


@dataclasses.dataclass
class Job(Request):
    """One line of --prompts (or the flags of a single --prompt): a Request plus its images."""

    image: str | None = option(None, help="edit: the image to change")
    references: list[str] = option(factory=list, help="reference images, priority order")


def read_jobs(path: Path, defaults: dict[str, Any]) -> tuple[list[tuple[int, Job]], list[str]]:
    """Valid jobs with their line numbers, and one error line per bad line (the rest still run). Every field is
    checked as the flags are, so a wrong type or value is that line's error, not a crash later."""
    if not path.is_file():
        raise UserError(f"--prompts '{path}' does not exist")
    jobs, errors = [], []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError:
            errors.append(f"error: {path} line {number}: not JSON; write one object a line")
            continue
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
            errors.append(
                f'error: {path} line {number}: needs a JSON object with a "prompt" string'
            )
            continue
        try:
            jobs.append((number, from_dict(Job, {**defaults, **data}, name=lambda key: f"'{key}'")))
        except UserError as exc:
            errors.append(f"error: {path} line {number}: {exc}")
    return jobs, errors


def _make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out '{out}' cannot be created ({exc.strerror})") from None


def generate(args: argparse.Namespace) -> int:
    opts = from_args(GeneratorOptions, args)
    quiet_libraries()
    from inference.generate import Generator

    defaults = {
        "seed": args.seed,
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "guidance": args.guidance,
        "image": args.image,
        "references": args.ref,
        "num_images": args.num_images,
    }
    if args.prompt is not None:
        flag = {"references": "--ref"}
        single = from_dict(
            Job,
            {**defaults, "prompt": args.prompt},
            name=lambda key: f"option '{flag.get(key, '--' + key.replace('_', '-'))}'",
        )
        jobs, errors = [(0, single)], []
    else:
        jobs, errors = read_jobs(Path(args.prompts), defaults)
    for line in errors:
        print(line, file=sys.stderr)
    if not jobs:
        raise UserError("no valid prompt to run")
    loras = [parse_lora(spec) for spec in args.lora]  # before the model loads: a typo costs nothing
    gen = Generator(args.model, **dataclasses.asdict(opts))
    for path, scale in loras:
        gen.add_adapter(path, scale=scale, allow_partial=args.allow_partial)
    if args.fuse:
        gen.fuse(permanent=True)  # the CLI never changes adapters afterwards
    out = Path(args.out)

    results, images, failed = [], [], len(errors)
    for number, job in tqdm(jobs, desc="generating", disable=len(jobs) == 1):
        try:
            fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(job)}
            made = gen.generate(fields.pop("prompt"), **fields, add_trigger=args.add_trigger)
        except UserError as exc:
            if args.prompt is not None:
                raise
            print(f"error: {args.prompts} line {number}: {exc}", file=sys.stderr)
            failed += 1
            continue
        _make_dir(out)  # only once there is something to put in it
        for item in made:
            name = f"{len(images):04d}_seed{item.record['seed']}.png"
            save_png(item.image, out / name, item.record)
            results.append({"file": name, **item.record})
            images.append(item.image)
    if results:
        write_text(
            out / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in results)
        )
    if images:
        with atomic_path(out / "grid.png") as tmp:
            make_grid(images, labels=[_grid_label(r) for r in results]).save(tmp, format="PNG")
    print(
        f"{len(images)} image(s) written to {out}" + (f"; {failed} job(s) failed" if failed else "")
    )
    return 1 if failed else 0  # partial success still says so in the exit code


def _add_tiny_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="new folder for the model (diffusers format)")
    p.add_argument(
        "--family", choices=list(FAMILIES), required=True, help="which FLUX.2 architecture"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="weights seed: the same seed writes the same bytes"
    )
    p.add_argument(
        "--distilled",
        action="store_true",
        help="mark the model step-distilled (families that have one)",
    )
    p.add_argument(
        "--random",
        action="store_true",
        help="the smallest random model (for tests) instead of the one pretrained on the shapes world",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it already holds files")


def tiny_model(args: argparse.Namespace) -> int:
    family = FAMILIES[args.family]
    if args.distilled and not family.has_distilled:
        raise UserError(f"--distilled: FLUX.2 {family.name} has no step-distilled variant")
    out = Path(args.dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise UserError(
            f"{out} already exists and is not empty; pick a new folder or add --overwrite to replace it"
        )
    quiet_libraries()
    from inference.tiny import write_tiny_model

    path = write_tiny_model(
        out, family, seed=args.seed, distilled=args.distilled, pretrained=not args.random
    )
    kind = "random" if args.random else "pretrained (synthetic shapes world)"
    print(f"tiny {kind} {args.family} model written to {path}")
    return 0


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "lora", help="a LoRA file written by flux2-lora (or a run folder: its final LoRA)"
    )
    p.add_argument(
        "--format",
        required=True,
        help="comfyui, kohya (musubi-tuner), bfl (ai-toolkit) or diffusers",
    )
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument(
        "--model",
        help="the base model (folder or hub id) a dora adapter's export reads its weights "
        "from (default: the base its header names)",
    )


def export(args: argparse.Namespace) -> int:
    from inference.export import export_lora
    from inference.lora_formats import FORMATS

    if args.format not in FORMATS:
        raise UserError(f"--format '{args.format}' is unknown; use one of {', '.join(FORMATS)}")
    counts = export_lora(args.lora, args.format, args.out, model=args.model)
    print(
        f"{counts['modules']} {counts['kind']} modules of a FLUX.2 {counts['family']} LoRA written as "
        f"{args.format} to {args.out} ({counts['written_modules']} modules, {counts['tensors']} tensors)"
    )
    # ai-toolkit cuts every loaded module to its own network rank, silently
    if args.format == "bfl":
        print(
            f"ai-toolkit: set network linear and linear_alpha to {counts['max_rank']} (the file's largest rank; "
            "a smaller one drops part of the fused qkv) and transformer_only: false to keep modules outside "
            "the blocks"
        )
    return 0


COMMANDS = {
    "tiny-model": Command(_add_tiny_model_arguments, tiny_model),
    "generate": Command(_add_generate_arguments, generate),
    "export": Command(_add_export_arguments, export),
}
