"""Per-step cost of LoRA at inference: base vs unfused LoRA vs fused LoRA, measured in one run.

    python benchmarks/inference_step.py [--family klein] [--size 256] [--repeats 5] [--steps 20]

Times the transformer forward (one denoising step) on fixed inputs, interleaving the three variants and
keeping the best of each, so machine noise hits all alike. Goal: fused <= 1.02 x base.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from data_tools.sample_data import write_sample_data
from inference.conditioning import build_inputs
from inference.families import FAMILIES
from inference.generate import Generator
from inference.tiny import write_tiny_model
from trainer.config import load_config
from trainer.recipe import run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="klein", choices=list(FAMILIES))
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="forward passes per timing")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny_model(tmp / "model", FAMILIES[args.family])
        data = write_sample_data(tmp / "data", count=4)
        lora = run(
            load_config(
                None,
                [
                    f"model.path={model}",
                    f"data.path={data}",
                    f"output.dir={tmp / 'run'}",
                    f"cache.dir={tmp / 'cache'}",
                    "train.steps=5",
                    "train.resolution=64",
                    f"lora.rank={args.rank}",
                    f"lora.alpha={args.rank}",
                ],
            ),
            show_progress=False,
        ).lora_path
        # the base with no adapter ever loaded: no peft wrappers at all
        plain = Generator(str(model))
        gen = Generator(str(model))
        gen.add_adapter(lora, name="bench")
        family = gen.family
        side = args.size // 16
        g = torch.Generator().manual_seed(0)
        target = torch.randn(1, 128, side, side, generator=g)
        inputs = build_inputs(
            family,
            family.pipeline_class._pack_latents(target),
            target.shape,
            torch.randn(1, 512, 48, generator=g),
        )
        kwargs = dict(
            hidden_states=inputs.hidden_states,
            timestep=torch.tensor([0.5]),
            guidance=family.guidance_input(4.0, 1),
            encoder_hidden_states=inputs.encoder_hidden_states,
            txt_ids=inputs.txt_ids,
            img_ids=inputs.img_ids,
            return_dict=False,
        )

        def timed(transformer) -> float:
            """Median time of one forward: robust to bursts of other load on a shared machine."""
            times = []
            with torch.no_grad():
                transformer(**kwargs)
                for _ in range(args.steps):
                    start = time.perf_counter()
                    transformer(**kwargs)
                    times.append(time.perf_counter() - start)
            return statistics.median(times)

        baked = Generator(str(model))  # fuse(permanent=True): merged weights, no LoRA layers left
        baked.add_adapter(lora, name="bench")
        baked.fuse(permanent=True)
        # a second copy of the base: how much two identical models differ
        control = Generator(str(model))
        best = {
            "base": float("inf"),
            "base_copy": float("inf"),
            "unfused": float("inf"),
            "fused": float("inf"),
            "fused_permanent": float("inf"),
        }
        for _ in range(args.repeats):
            best["base"] = min(best["base"], timed(plain.pipe.transformer))
            best["base_copy"] = min(best["base_copy"], timed(control.pipe.transformer))
            best["unfused"] = min(best["unfused"], timed(gen.pipe.transformer))
            gen.fuse()
            best["fused"] = min(best["fused"], timed(gen.pipe.transformer))
            gen.unfuse()
            best["fused_permanent"] = min(best["fused_permanent"], timed(baked.pipe.transformer))

    print(
        f"family={args.family} size={args.size}px tokens={side * side} rank={args.rank} "
        f"best of {args.repeats} medians of {args.steps} forward passes, threads={torch.get_num_threads()}"
    )
    for name, seconds in best.items():
        print(f"{name:16s} {seconds * 1e3:8.2f} ms/step  ({seconds / best['base']:.3f} x base)")
    print(
        f"fused/base = {best['fused'] / best['base']:.3f} (reversible: peft layers stay, merged), "
        f"fused_permanent/base = {best['fused_permanent'] / best['base']:.3f} (goal <= 1.02)"
    )


if __name__ == "__main__":
    main()
