"""Pretrain the tiny FLUX.2 on the synthetic shapes world, so a LoRA trained on it visibly learns something.

    python scripts/pretrain_tiny.py                    # VAE, then the klein and dev transformers (~75 min)
    python scripts/pretrain_tiny.py --family klein     # reuse the shipped VAE, retrain one transformer (24 min;
                                                       # dev 28 min: run the two side by side on 2 cores)

Everything goes through the real diffusers classes and the project's own flow-matching code
(trainer/flow.py, inference/conditioning.py), so the pretrained model is conditioned exactly as training
and inference condition it. Deterministic at a fixed thread count (--threads): same arguments, same bytes.
Writes inference/tiny_weights/{vae,klein,dev}.safetensors and their checksums (SHA256SUMS).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common.atomic import atomic_path, write_text
from common.errors import run_guarded
from common.synthetic import COLOURS, SHAPES, colour_counts, mark_scene, random_scene
from inference import tiny
from inference.conditioning import build_inputs, predict_velocity
from inference.families import FAMILIES
from trainer.flow import FlowConfig, interpolate, training_sigmas, velocity_target

LR = 2e-3
VAE_LR = 3e-3
# Transformer pool: scenes per size (width, height), drawn and VAE-encoded once (encoding every batch would cost
# more than the transformer step). 64 px is what the quickstart, the tests and the learning guard use.
POOL = {(64, 64): 12288, (80, 48): 2048, (48, 80): 2048, (128, 128): 1024}
SIZE_ODDS = [(64, 64)] * 6 + [(80, 48), (48, 80), (128, 128)]
# Transformer steps on the prompts' own text tokens, sized to the 30-minute-per-family budget at one thread (dev's
# steps cost more: 128 text tokens for its system prompt, and a guided step's extra forward)
STEPS = {"klein": 7000, "dev": 4500}
SAMPLE_STEPS = 12  # what the quickstart's sample grids and the learning guard generate with


def _pixels(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _cosine(step: int, total: int, warmup: int = 100) -> float:
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))


def pretrain_vae(vae, steps: int, seed: int) -> dict[str, float]:
    """Reconstruction (L1 + MSE) with a light KL, on random 64 px scenes (a convolutional VAE learned at 64 px
    reconstructs 128 px as well, at a third of the cost); then the latent normalisation statistics."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    vae.train()
    for step in tqdm(range(steps), desc="vae", mininterval=5):
        x = _pixels([random_scene(rng, 64, 64)[0] for _ in range(16)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + 1e-6 * posterior.kl().mean()
        for group in opt.param_groups:
            group["lr"] = VAE_LR * _cosine(step, steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    # FLUX.2 normalises patchified latents with the VAE's batch-norm statistics: fit them to this world.
    from diffusers import Flux2KleinPipeline

    with torch.no_grad():
        latents = []
        for _ in range(32):
            x = _pixels([random_scene(rng, 64, 64)[0] for _ in range(32)])
            latents.append(Flux2KleinPipeline._patchify_latents(vae.encode(x).latent_dist.mode()))
        z = torch.cat(latents).transpose(0, 1).reshape(128, -1)
        vae.bn.running_mean.copy_(z.mean(1))
        vae.bn.running_var.copy_(z.var(1))
        quality = {}
        for name, images in (
            ("scenes 64 px", [random_scene(rng, 64, 64)[0] for _ in range(64)]),
            ("scenes 128 px", [random_scene(rng, 128, 128)[0] for _ in range(32)]),
            ("brand mark 64 px", [mark_scene(64, 64, b, 32, 32, 20)[0] for b in COLOURS]),
        ):
            x = _pixels(images)
            recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            quality[name] = round(10 * math.log10(4.0 / ((recon - x) ** 2).mean().item()), 1)
    print("vae: reconstruction PSNR " + ", ".join(f"{v} dB on {k}" for k, v in quality.items()))
    return quality


def _captions() -> list[str]:
    return sorted(
        f"a {c} {s} on a {b} background" for c in COLOURS for s in SHAPES for b in COLOURS if c != b
    )


def _scene_pool(
    pipe, rng: random.Random
) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Size, list[str]]]:
    """Per size: packed normalised latents (N, tokens, 128), the unpacked shape, and the captions."""
    pool = {}
    with torch.no_grad():
        for (w, h), count in tqdm(POOL.items(), desc="encode scenes", mininterval=5):
            tokens, captions = [], []
            for i in range(0, count, 64):
                scenes = [random_scene(rng, w, h) for _ in range(min(64, count - i))]
                x0 = pipe._encode_vae_image(image=_pixels([s[0] for s in scenes]), generator=None)
                tokens.append(pipe._pack_latents(x0))
                captions += [c for _, c in scenes]
            pool[(w, h)] = (torch.cat(tokens), x0.shape[1:], captions)
    return pool


def pretrain_transformer(
    pipe, family, steps: int, long_steps: int, batch: int, seed: int, shift: str
) -> None:
    """Flow matching on a pool of encoded random scenes: a fast phase on the prompts' first text tokens, then a
    phase on all 512 (padding included) so the model copes with the full sequence the pipelines feed it."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    captions = _captions()
    print(f"{family.name}: encoding {len(captions)} captions and the empty prompt ...")
    lengths = []  # real (unpadded) text tokens, read from the attention mask the pipeline gives its encoder
    hook = pipe.text_encoder.register_forward_pre_hook(
        lambda _m, _a, kw: lengths.append(int(kw["attention_mask"].sum(1).max())), with_kwargs=True
    )
    with torch.no_grad():
        embeds = {}
        for i in range(0, len(captions), 64):
            chunk = captions[i : i + 64]
            out, _ = pipe.encode_prompt(prompt=chunk, device="cpu")
            embeds.update(zip(chunk, out))
        embeds[""] = pipe.encode_prompt(prompt=[""], device="cpu")[0][0]
    hook.remove()
    # the fast phase keeps the prompts' own tokens and a few padding ones (causal encoders: the prefix of the
    # 512-token embedding is exactly what a shorter padding would give)
    short = -(-max(lengths) // 16) * 16 + 16
    print(
        f"{family.name}: prompts take up to {max(lengths)} text tokens; fast phase on the first {short}"
    )
    pool = _scene_pool(pipe, rng)
    transformer = pipe.transformer
    transformer.train()
    # Pretraining matches the pipelines' own sampling schedule (empirical, e^mu = 6.6 at 64 tokens and 12 steps): 8 of
    # its 12 steps sit above sigma 0.8, where FLUX.1's dynamic shift puts 17 % of training. After 1,200 steps
    # klein drew 68 % of the asked backgrounds with it, 18 % with dynamic. (The quickstart's LoRA trains on it too;
    # LoRAs on real FLUX.2 keep the default, dynamic, the shift it was trained with.)
    flow = FlowConfig(shift=shift, shift_reference_steps=SAMPLE_STEPS)
    opt = torch.optim.AdamW(transformer.parameters(), lr=LR, weight_decay=0.01)
    total = steps + long_steps
    for step in tqdm(range(total), desc=family.name, mininterval=5):
        w, h = SIZE_ODDS[rng.randrange(len(SIZE_ODDS))]
        latents, shape, names = pool[(w, h)]
        # same pixels a step
        pick = [rng.randrange(len(names)) for _ in range(max(1, batch * 64 * 64 // (w * h)))]
        tokens = latents[pick]
        # dropout: the empty prompt CFG runs against
        prompts = [names[i] if rng.random() > 0.1 else "" for i in pick]
        text = torch.stack([embeds[p] for p in prompts])
        if step < steps:
            text = text[:, :short]
        noise = torch.randn(tokens.shape, generator=gen)
        sigma = training_sigmas(flow, len(pick), tokens.shape[1], gen)
        noisy = interpolate(tokens, noise, sigma)
        target = velocity_target(tokens, noise)
        # drawn for every family, so one seed draws the same scenes for all
        guidance = rng.uniform(1.0, 5.0)
        if family.has_guidance_embedding:
            # plain targets on even steps and in the long phase (a guided 512-token step costs as much as four)
            guidance = guidance if steps // 4 <= step < steps and step % 2 else 1.0
            target = _self_guided(
                transformer, family, noisy, shape, text, embeds[""], sigma, target, guidance
            )
        pred = predict_velocity(
            transformer,
            family,
            build_inputs(family, noisy, (len(pick), *shape), text),
            sigma,
            guidance=guidance,
        )
        loss = ((pred - target) ** 2).mean()
        for group in opt.param_groups:
            group["lr"] = LR * (0.1 + 0.9 * _cosine(step, total))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        if step % 200 == 0:
            tqdm.write(f"{family.name} step {step}: loss {loss.item():.4f}")
    transformer.eval()


def _self_guided(transformer, family, noisy, shape, text, empty, sigma, target, guidance: float):
    """dev's pipeline runs no classifier-free guidance: it feeds the guidance value to the transformer, which
    real [dev] learned by distillation. The tiny one learns it from itself: at guidance g the target is
    target + (g - 1) (target - v_uncond), with v_uncond the model's own empty-prompt velocity at g = 1, read
    without gradients. The flow-matching target is an unbiased sample of the prompted velocity, so the regression
    still converges to CFG's v_uncond + g (v_cond - v_uncond), for one extra forward instead of two.
    Without it dev drew 2.5 % of the asked backgrounds (chance: 6 %)."""
    if guidance == 1.0:
        return target
    batch = noisy.shape[0]
    with torch.no_grad():
        inputs = build_inputs(
            family, noisy, (batch, *shape), empty[: text.shape[1]].expand(batch, -1, -1)
        )
        uncond = predict_velocity(transformer, family, inputs, sigma, guidance=1.0)
    return target + (guidance - 1.0) * (target - uncond)


def prompt_following(
    pipe, family, count: int, seed: int, sheet: Path
) -> tuple[float, float, list[str]]:
    """Share of generated images whose background / shape colour is the nearest named colour to what was asked;
    the first 16 images are written to `sheet` (4 x 4, row by row, in the order of the returned prompts)."""
    rng = random.Random(seed)
    pipe.set_progress_bar_config(disable=True)
    names = list(COLOURS)
    bg_ok = fg_ok = 0
    images, prompts = [], []
    for _ in range(count):
        colour, background = rng.sample(names, 2)
        prompt = f"a {colour} {rng.choice(SHAPES)} on a {background} background"
        image = pipe(
            prompt=prompt,
            height=64,
            width=64,
            num_inference_steps=SAMPLE_STEPS,
            generator=torch.Generator().manual_seed(rng.randrange(10**6)),
        ).images[0]
        images.append(image)
        prompts.append(prompt)
        present = list(colour_counts(np.asarray(image)))
        bg_ok += present[0] == background
        fg_ok += present[1:2] == [colour]  # the most common colour after the background
    grid = Image.new("RGB", (4 * 64, 4 * 64), "white")
    for i, image in enumerate(images[:16]):
        grid.paste(image, (i % 4 * 64, i // 4 * 64))
    with atomic_path(sheet) as tmp:
        grid.save(tmp, format="PNG")
    return bg_ok / count, fg_ok / count, prompts[:16]


def _record(weights: Path, arguments: dict, since: float, quality: dict) -> None:
    """<weights>.build.json: how the file was made (arguments, threads, library versions, time) and how good it is,
    so a rebuild can be compared with what ships."""
    import diffusers
    import transformers

    record = {
        "file": weights.name,
        "arguments": arguments,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "seconds": round(time.perf_counter() - since),
        "quality": quality,
    }
    write_text(weights.with_name(weights.stem + ".build.json"), json.dumps(record, indent=2) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--family",
        choices=["all", "vae", *FAMILIES],
        default="all",
        help="all: the VAE, then every family's transformer; vae: the VAE only",
    )
    ap.add_argument("--out", default=str(tiny.WEIGHTS_DIR))
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (results are bit-identical at the same count)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=2500)
    ap.add_argument(
        "--steps",
        type=int,
        help=f"transformer steps on the prompts' own text tokens (default {STEPS})",
    )
    ap.add_argument(
        "--long-steps", type=int, default=100, help="transformer steps on all 512 text tokens"
    )
    ap.add_argument(
        "--shift",
        choices=["empirical", "dynamic", "none"],
        default="empirical",
        help="training sigma shift (trainer/flow.py)",
    )
    ap.add_argument("--batch", type=int, default=16, help="64 px scenes a step (fewer larger ones)")
    ap.add_argument(
        "--check", type=int, default=40, help="prompts generated to measure prompt following"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    start = time.perf_counter()
    families = (
        list(FAMILIES.values())
        if args.family == "all"
        else [FAMILIES[args.family]]
        if args.family in FAMILIES
        else []
    )
    vae_weights = None
    if args.family in ("all", "vae"):
        pipe = tiny.build_tiny_pipeline(
            FAMILIES["klein"], seed=args.seed, pretrained=False, size="pretrained"
        )
        quality = pretrain_vae(pipe.vae, args.vae_steps, args.seed)
        vae_weights = pipe.vae.state_dict()
        tiny.save_weights(out / "vae.safetensors", vae_weights)
        _record(out / "vae.safetensors", vars(args), start, {"psnr_db": quality})
        print(f"vae done after {time.perf_counter() - start:.0f} s")
    for family in families:
        t0 = time.perf_counter()
        pipe = tiny.build_tiny_pipeline(family, seed=args.seed, pretrained=False, size="pretrained")
        if vae_weights is None:  # the one beside the output, else the shipped one
            vae_file = out / "vae.safetensors"
            vae_file = vae_file if vae_file.exists() else tiny.WEIGHTS_DIR / vae_file.name
            print(f"{family.name}: VAE from {vae_file}")
            vae_weights = tiny.load_weights(vae_file)
        pipe.vae.load_state_dict(vae_weights)
        steps = args.steps or STEPS[family.name]
        pretrain_transformer(
            pipe, family, steps, args.long_steps, args.batch, args.seed, args.shift
        )
        weights = {f"transformer.{k}": v for k, v in pipe.transformer.state_dict().items()}
        weights |= {f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
        tiny.save_weights(out / f"{family.name}.safetensors", weights)
        bg, fg, shown = prompt_following(
            pipe, family, args.check, args.seed + 1, out / f"{family.name}.samples.png"
        )
        _record(
            out / f"{family.name}.safetensors",
            vars(args) | {"steps": steps},
            t0,
            {
                "background_colour_right": bg,
                "shape_colour_right": fg,
                "prompts": args.check,
                "samples.png": shown,
            },
        )
        print(
            f"{family.name}: {time.perf_counter() - t0:.0f} s; prompt following on {args.check} prompts: "
            f"background colour {bg:.0%}, shape colour {fg:.0%}"
        )
    tiny.write_checksums(out)
    print(
        f"total {time.perf_counter() - start:.0f} s at {args.threads} threads; weights and SHA256SUMS in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
