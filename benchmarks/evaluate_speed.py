"""`flux2-lora evaluate` speed on the README's example, against a floor measured in the same run.

    python benchmarks/evaluate_speed.py

Trains the quickstart-sized tiny run once (200 steps, checkpoints at 100), then times the README's evaluation
(suite product, 2 checkpoints x scales 0/0.5/1 x 2 seeds, 8 steps, 64 px) end to end, and its rendering
against a floor: the stock pipeline rendering the same number of images from pre-encoded prompts, seeds
batched, with no adapter at all. Also prints the text-encoder calls (one per distinct prompt, not per render).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from data_tools.sample_data import write_sample_data
from evaluation.evaluate import adapters_from_run, evaluate
from evaluation.suites import load_suite, render_prompt
from inference.families import FAMILIES
from inference.tiny import write_tiny_model
from trainer.config import load_config
from trainer.recipe import run


def floor_seconds(model: Path, prompts: list[str], renders: int, seeds: int) -> float:
    pipe = FAMILIES["klein"].pipeline_class.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    embeds = {p: pipe.encode_prompt(prompt=p)[0] for p in prompts + [""]}
    start, done = time.perf_counter(), 0
    while done < renders:
        for p in prompts:
            pipe(
                prompt_embeds=embeds[p],
                negative_prompt_embeds=embeds[""],
                width=64,
                height=64,
                num_inference_steps=8,
                guidance_scale=4.0,
                num_images_per_prompt=seeds,
                generator=[torch.Generator().manual_seed(s) for s in range(seeds)],
            )
            done += seeds
            if done >= renders:
                break
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = write_tiny_model(root / "model", FAMILIES["klein"])
        data = write_sample_data(root / "data")
        cfg = load_config(
            None,
            [
                f"model.path={model}",
                f"data.path={data}",
                "data.trigger=zxq",
                "train.steps=200",
                "train.batch_size=2",
                "train.resolution=64",
                "lora.rank=8",
                "optim.lr=1e-3",
                "checkpoint.every=100",
                f"output.dir={root / 'run'}",
                f"cache.dir={root / 'cache'}",
            ],
        )
        run(cfg, show_progress=False)
        suite = load_suite("product")
        start = time.perf_counter()
        result = evaluate(
            str(model),
            adapters_from_run(root / "run"),
            suite,
            root / "eval",
            scales=(0, 0.5, 1),
            seeds=2,
            steps=8,
            width=64,
            height=64,
            references=str(data),
            show_progress=False,
        )
        total = time.perf_counter() - start
        speed = result["speed"]
        prompts = [render_prompt(p, "zxq") for p in suite.prompts if p.kind != "edit"]
        floor = floor_seconds(model, prompts, speed["renders"], 2)
    print(
        f"README evaluation: {total:.1f} s end to end (model loading, rendering, metrics, report)"
    )
    print(
        f"rendering: {speed['renders']} images in {speed['render_seconds']:.2f} s = "
        f"{speed['renders_per_second']:.1f} renders/s; text encoder ran {speed['text_encoder_calls']} times"
    )
    print(
        f"floor (stock pipeline, pre-encoded prompts, no adapter): {speed['renders'] / floor:.1f} renders/s "
        f"-> evaluate renders at {floor / speed['render_seconds']:.2f}x the floor's speed"
    )


if __name__ == "__main__":
    main()
