"""Training-loop overhead and encoder calls, measured in one run on the tiny model.

    python benchmarks/train_step.py [--family klein] [--steps 200] [--resolution 64]

Prints (1) the real loop's time per step against a bare forward + backward + AdamW floor on one cached
batch of the same shape (goal <= 1.05x), and (2) text-encoder calls: one per unique caption (plus the
empty caption used for dropout) on a cold cache, zero on a rerun.
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
from PIL import Image

from data_tools.dataset import DataConfig, load_samples
from data_tools.sample_data import write_sample_data
from inference.conditioning import build_inputs, predict_velocity
from inference.families import FAMILIES
from inference.loading import ModelConfig, load_pipeline, resolve_base_model
from inference.tiny import write_tiny_model
from trainer.cache import CacheConfig, build_features
from trainer.config import load_config
from trainer.flow import interpolate, velocity_target
from trainer.lora import LoraSettings, add_lora, trainable_parameters
from trainer.recipe import run


def floor_seconds_per_step(
    model_dir: Path, data: Path, cache: Path, steps: int, resolution: int, rank: int
) -> float:
    """Forward + backward + AdamW on one fixed cached batch: the cost no loop can avoid."""
    base = resolve_base_model(ModelConfig(path=str(model_dir)))
    samples = load_samples(DataConfig(path=str(data), trigger="zxq"), resolution)
    features = build_features(
        samples, base, ModelConfig(path=base.path), CacheConfig(dir=str(cache)), show_progress=False
    )
    transformer = load_pipeline(base, text_encoder=False, vae=False).transformer
    add_lora(transformer, LoraSettings(rank=rank, alpha=rank), seed=0)
    transformer.train()
    optimizer = torch.optim.AdamW(trainable_parameters(transformer), lr=1e-4)
    x0 = features.latents[0]
    tokens = base.family.pipeline_class._pack_latents(x0)
    noise = torch.randn_like(tokens)
    sigma = torch.tensor([0.5])
    inputs = build_inputs(
        base.family,
        interpolate(tokens, noise, sigma),
        x0.shape,
        features.embeds[samples[0].caption],
    )
    target = velocity_target(tokens, noise)

    params = trainable_parameters(transformer)

    def one_step() -> float:
        start = time.perf_counter()
        pred = predict_velocity(transformer, base.family, inputs, sigma, 1.0)
        torch.nn.functional.mse_loss(pred, target).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(10):
        one_step()
    return statistics.median(one_step() for _ in range(steps))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="klein", choices=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--options", action="store_true", help="also time each recipe option against the plain loop"
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny_model(tmp / "model", FAMILIES[args.family])
        # one bucket only, so the loop and the floor run the same shapes (shape changes cost the kernels too)
        data = write_sample_data(tmp / "data", count=12)
        for png in data.glob("*.png"):
            if Image.open(png).size != (256, 256):
                png.unlink()
                png.with_suffix(".txt").unlink()
        captions = len({p.read_text() for p in data.glob("*.txt")})

        def train(name: str, steps: int, extra: tuple[str, ...] = ()):
            overrides = [
                f"model.path={model}",
                f"data.path={data}",
                "data.trigger=zxq",
                f"output.dir={tmp / name}",
                f"cache.dir={tmp / 'cache'}",
                f"train.steps={steps}",
                "train.batch_size=1",
                f"train.resolution={args.resolution}",
                "train.caption_dropout=0.0",
                "train.log_every=1000",
                f"lora.rank={args.rank}",
                f"lora.alpha={args.rank}",
                *extra,
            ]
            return run(load_config(None, overrides), show_progress=False)

        cold = train("cold", 1)
        # median step time (robust to bursts of other load), interleaved repeats, best of each: on a shared
        # 2-core machine whole-run timings wander by +-25%
        loops, floors = [], []
        for repeat in range(args.repeats):
            warm = train(f"warm{repeat}", args.steps)
            # after the same 10 warm-up steps
            loops.append(statistics.median(warm.step_seconds[10:]))
            floors.append(
                floor_seconds_per_step(
                    model, data, tmp / "cache", args.steps, args.resolution, args.rank
                )
            )
        loop, floor = min(loops), min(floors)
        costs = option_costs(train, args) if args.options else []

    print(
        f"family={args.family} resolution={args.resolution} rank={args.rank} steps={args.steps} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"median step time, best of {args.repeats} interleaved repeats each")
    print(f"loop  {loop * 1e3:8.2f} ms/step (recipe: batch plan, noise, ids, accelerate, progress)")
    print(f"floor {floor * 1e3:8.2f} ms/step (bare forward + backward + AdamW on one cached batch)")
    print(f"ratio loop/floor = {loop / floor:.3f}  (goal <= 1.05)")
    print(
        f"text-encoder calls: cold cache {cold.text_encoder_calls} for {captions} unique captions + 1 empty "
        f"(goal {captions + 1}); rerun {warm.text_encoder_calls} (goal 0)"
    )
    print(
        f"vae calls: cold cache {cold.vae_calls} for {cold.vae_calls} images; rerun {warm.vae_calls}"
    )
    if costs:
        print(
            "\noption cost per step (median, best of the repeats; the plain loop timed interleaved with them):"
        )
        print(f"{'option':<44} {'ms/step':>8} {'x plain':>8}")
        for name, ms, ratio in costs:
            print(f"{name:<44} {ms:8.2f} {ratio:8.2f}")


OPTIONS = [
    ("plain (lora, adamw)", ()),
    ("lora.type=dora", ("lora.type=dora",)),
    ("lora.type=lokr", ("lora.type=lokr",)),
    ("lora.type=loha", ("lora.type=loha",)),
    ("optim.name=prodigy", ("optim.name=prodigy", "optim.lr=1.0")),
    (
        "regularization.preserve",
        ("regularization.preserve=true", "regularization.class_prompt=a logo"),
    ),
    ("ema.decay=0.999", ("ema.decay=0.999",)),
    ("data.shuffle_tags + tag_dropout", ("data.shuffle_tags=true", "data.tag_dropout=0.2")),
    ("flow.shift=empirical (vs dynamic)", ("flow.shift=empirical",)),
]


def option_costs(train, args) -> list[tuple[str, float, float]]:
    """Each option's median step time; every option run is paired with a plain run so load drifts cancel."""
    times: dict[str, list[float]] = {name: [] for name, _ in OPTIONS}
    steps = max(30, args.steps // 4)
    for repeat in range(args.repeats):
        for name, extra in OPTIONS:
            result = train(f"opt{repeat}-{len(times[name])}-{name.split()[0]}", steps, extra)
            times[name].append(statistics.median(result.step_seconds[5:]))
    plain = min(times[OPTIONS[0][0]])
    return [(name, min(times[name]) * 1e3, min(times[name]) / plain) for name, _ in OPTIONS]


if __name__ == "__main__":
    main()
