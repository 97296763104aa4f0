"""`flux2-lora generate`: prompts (or a JSONL of jobs) -> PNGs with provenance, results.jsonl and a grid."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from data_tools.atomic import atomic_path, write_text
from data_tools.errors import UserError
from inference.grids import make_grid
from inference.provenance import save_png

JOB_KEYS = {"prompt", "seed", "width", "height", "steps", "guidance", "image", "references", "num_images"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: diffusers folder or hub id")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="repeatable")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompts", metavar="FILE.jsonl", help="one job per line: prompt, seed, width, height, "
                     "steps, guidance, image, references, num_images")
    p.add_argument("--image", help="edit: the image to change")
    p.add_argument("--ref", action="append", default=[], help="reference image (repeatable, priority order)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--add-trigger", action="store_true", help="prepend each LoRA's trigger word")
    p.add_argument("--fuse", action="store_true", help="fuse the LoRAs into the base weights (faster steps)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--fp8-storage", action="store_true", help="store transformer weights in float8 (about half the memory)")
    p.add_argument("--group-offload", default="none", choices=["none", "block", "leaf"],
                   help="keep weights in CPU RAM, stream blocks to the device")
    p.add_argument("--cpu-offload", action="store_true", help="model CPU offload (needs a GPU)")
    p.add_argument("--vae-tiling", action="store_true", help="decode large images in tiles")
    p.add_argument("--out", required=True)


def parse_lora(spec: str) -> tuple[str, float]:
    path, _, scale = spec.rpartition(":")
    if path and scale:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


def read_jobs(path: Path, defaults: dict[str, Any]) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """Valid jobs with their line numbers, and one error line per bad line (the rest still run)."""
    if not path.is_file():
        raise UserError(f"--prompts '{path}' does not exist")
    jobs, errors = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
            if not isinstance(job, dict) or not isinstance(job.get("prompt"), str):
                raise ValueError('needs a JSON object with a "prompt" string')
            unknown = set(job) - JOB_KEYS
            if unknown:
                raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(JOB_KEYS))}")
            jobs.append((number, {**defaults, **job}))
        except ValueError as exc:
            errors.append(f"error: {path} line {number}: {exc}")
    return jobs, errors


def _make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out '{out}' cannot be created ({exc.strerror})") from None


def run(args: argparse.Namespace) -> int:
    from inference.generate import Generator

    defaults = {"seed": args.seed, "width": args.width, "height": args.height, "steps": args.steps,
                "guidance": args.guidance, "image": args.image, "references": args.ref, "num_images": args.num_images}
    if args.prompt is not None:
        jobs, errors = [(0, {**defaults, "prompt": args.prompt})], []
    else:
        jobs, errors = read_jobs(Path(args.prompts), defaults)
    for line in errors:
        print(line, file=sys.stderr)
    if not jobs:
        raise UserError("no valid prompt to run")
    gen = Generator(args.model, dtype=args.dtype, device=args.device, fp8_storage=args.fp8_storage,
                    group_offload=args.group_offload, model_cpu_offload=args.cpu_offload, vae_tiling=args.vae_tiling)
    for spec in args.lora:
        path, scale = parse_lora(spec)
        gen.add_adapter(path, scale=scale)
    if args.fuse:
        gen.fuse(permanent=True)  # the CLI never changes adapters afterwards
    out = Path(args.out)

    results, images, failed = [], [], len(errors)
    for number, job in tqdm(jobs, desc="generating", disable=len(jobs) == 1):
        try:
            made = gen.generate(job["prompt"], image=job["image"], references=job["references"], width=job["width"],
                                height=job["height"], steps=job["steps"], guidance=job["guidance"],
                                seed=int(job["seed"]), num_images=int(job["num_images"]), add_trigger=args.add_trigger)
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
        write_text(out / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in results))
    if len(images) > 1:
        with atomic_path(out / "grid.png") as tmp:
            make_grid(images, labels=[f"seed {r['seed']}" for r in results]).save(tmp, format="PNG")
    print(f"{len(images)} image(s) written to {out}" + (f"; {failed} job(s) failed" if failed else ""))
    return 1 if failed else 0  # partial success still says so in the exit code
