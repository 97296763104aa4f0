"""Pretrain the tiny FLUX.2 on the synthetic shapes world, so a LoRA trained on it visibly learns something.

    python scripts/pretrain_tiny.py                    # VAE, then the klein and dev transformers (~25 min, 2 cores)
    python scripts/pretrain_tiny.py --family klein     # reuse the shipped VAE, retrain one transformer

Everything goes through the real diffusers classes and the project's own flow-matching code
(trainer/flow.py, inference/conditioning.py), so the pretrained model is conditioned exactly as training
and inference condition it. Deterministic at a fixed thread count (--threads): same arguments, same bytes.
Writes inference/tiny_weights/{vae,klein,dev}.safetensors and their checksums (SHA256SUMS).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.synthetic import COLOURS, SHAPES, hex_rgb, random_scene  # noqa: E402
from inference import tiny  # noqa: E402
from inference.conditioning import build_inputs, predict_velocity  # noqa: E402
from inference.families import FAMILIES  # noqa: E402
from trainer.flow import FlowConfig, interpolate, training_sigmas, velocity_target  # noqa: E402

LR = 2e-3
SIZES = [(64, 64), (64, 64), (80, 48), (48, 80), (128, 128)]  # (width, height); 64 px most of the time


def _pixels(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def pretrain_vae(vae, steps: int, seed: int) -> None:
    """Reconstruction (L1 + MSE) with a light KL, on random scenes; then the latent normalisation statistics."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    vae.train()
    for step in tqdm(range(steps), desc="vae", mininterval=5):
        w, h = SIZES[step % len(SIZES)]
        x = _pixels([random_scene(rng, w, h)[0] for _ in range(16)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + 1e-6 * posterior.kl().mean()
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
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
        x = _pixels([random_scene(rng, 64, 64)[0] for _ in range(64)])
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        psnr = 10 * math.log10(4.0 / ((recon - x) ** 2).mean().item())
    print(f"vae: reconstruction PSNR {psnr:.1f} dB on 64 held-out scenes")


def _captions() -> list[str]:
    return sorted(f"a {c} {s} on a {b} background" for c in COLOURS for s in SHAPES for b in COLOURS if c != b)


def pretrain_transformer(pipe, family, steps: int, long_steps: int, batch: int, seed: int) -> None:
    """Flow matching on random scenes: a fast phase on the prompts' first 64 text tokens, then a phase on all
    512 (padding included) so the model copes with the full sequence the pipelines feed it."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    captions = _captions()
    print(f"{family.name}: encoding {len(captions)} captions and the empty prompt ...")
    lengths = []  # real (unpadded) text tokens, read from the attention mask the pipeline gives its encoder
    hook = pipe.text_encoder.register_forward_pre_hook(
        lambda _m, _a, kw: lengths.append(int(kw["attention_mask"].sum(1).max())), with_kwargs=True)
    with torch.no_grad():
        embeds = {}
        for i in range(0, len(captions), 64):
            chunk = captions[i:i + 64]
            out, _ = pipe.encode_prompt(prompt=chunk, device="cpu")
            embeds.update(zip(chunk, out))
        embeds[""] = pipe.encode_prompt(prompt=[""], device="cpu")[0][0]
    hook.remove()
    # the fast phase keeps the prompts' own tokens and a few padding ones (causal encoders: the prefix of the
    # 512-token embedding is exactly what a shorter padding would give)
    short = -(-max(lengths) // 16) * 16 + 16
    print(f"{family.name}: prompts take up to {max(lengths)} text tokens; fast phase on the first {short}")
    transformer = pipe.transformer
    transformer.train()
    flow = FlowConfig()
    opt = torch.optim.AdamW(transformer.parameters(), lr=LR, weight_decay=0.01)
    total = steps + long_steps
    for step in tqdm(range(total), desc=family.name, mininterval=5):
        w, h = SIZES[rng.randrange(len(SIZES))]
        scenes = [random_scene(rng, w, h) for _ in range(batch)]
        with torch.no_grad():
            x0 = pipe._encode_vae_image(image=_pixels([s[0] for s in scenes]), generator=None)
        prompts = [c if rng.random() > 0.1 else "" for _, c in scenes]  # dropout: the empty prompt CFG runs against
        text = torch.stack([embeds[p] for p in prompts])
        if step < steps:
            text = text[:, :short]
        tokens = pipe._pack_latents(x0)
        noise = torch.randn(tokens.shape, generator=gen)
        sigma = training_sigmas(flow, batch, tokens.shape[1], gen)
        inputs = build_inputs(family, interpolate(tokens, noise, sigma), x0.shape, text)
        # dev embeds a guidance value: train it over the range sampling uses (the pipeline's default is 4)
        pred = predict_velocity(transformer, family, inputs, sigma, guidance=rng.uniform(1.0, 5.0))
        loss = ((pred - velocity_target(tokens, noise)) ** 2).mean()
        warm = min(1.0, (step + 1) / 100)
        for group in opt.param_groups:
            group["lr"] = LR * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        if step % 200 == 0:
            tqdm.write(f"{family.name} step {step}: loss {loss.item():.4f}")
    transformer.eval()


def prompt_following(pipe, family, count: int, seed: int) -> tuple[float, float]:
    """Share of generated images whose background / shape colour is the nearest named colour to what was asked."""
    rng = random.Random(seed)
    pipe.set_progress_bar_config(disable=True)
    names = list(COLOURS)
    table = np.array([hex_rgb(COLOURS[n]) for n in names], dtype=np.float32)
    bg_ok = fg_ok = 0
    for _ in range(count):
        colour, background = rng.sample(names, 2)
        prompt = f"a {colour} {rng.choice(SHAPES)} on a {background} background"
        image = pipe(prompt=prompt, height=64, width=64, num_inference_steps=12,
                     generator=torch.Generator().manual_seed(rng.randrange(10**6))).images[0]
        px = np.asarray(image, dtype=np.float32).reshape(-1, 3)
        nearest = np.argmin(((px[:, None, :] - table[None]) ** 2).sum(-1), axis=1)
        counts = np.bincount(nearest, minlength=len(names))
        bg = counts.argmax()
        counts[bg] = 0
        bg_ok += names[bg] == background
        fg_ok += names[counts.argmax()] == colour
    return bg_ok / count, fg_ok / count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["all", "vae", *FAMILIES], default="all",
                    help="all: the VAE, then every family's transformer; vae: the VAE only")
    ap.add_argument("--out", default=str(tiny.WEIGHTS_DIR))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (results are bit-identical at the same count)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=4000, help="transformer steps on the prompts' own text tokens")
    ap.add_argument("--long-steps", type=int, default=150, help="transformer steps on all 512 text tokens")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--check", type=int, default=40, help="prompts generated to measure prompt following")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = Path(args.out)
    start = time.perf_counter()
    families = list(FAMILIES.values()) if args.family == "all" else [FAMILIES[args.family]] \
        if args.family in FAMILIES else []
    vae_weights = None
    if args.family in ("all", "vae"):
        pipe = tiny.build_tiny_pipeline(FAMILIES["klein"], seed=args.seed, pretrained=False, size="pretrained")
        pretrain_vae(pipe.vae, args.vae_steps, args.seed)
        vae_weights = pipe.vae.state_dict()
        tiny.save_weights(out / "vae.safetensors", vae_weights)
        print(f"vae done after {time.perf_counter() - start:.0f} s")
    for family in families:
        t0 = time.perf_counter()
        pipe = tiny.build_tiny_pipeline(family, seed=args.seed, pretrained=False, size="pretrained")
        if vae_weights is None:
            vae_weights = tiny.load_weights(out / "vae.safetensors")
        pipe.vae.load_state_dict(vae_weights)
        pretrain_transformer(pipe, family, args.steps, args.long_steps, args.batch, args.seed)
        weights = {f"transformer.{k}": v for k, v in pipe.transformer.state_dict().items()}
        weights |= {f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
        tiny.save_weights(out / f"{family.name}.safetensors", weights)
        bg, fg = prompt_following(pipe, family, args.check, args.seed + 1)
        print(f"{family.name}: {time.perf_counter() - t0:.0f} s; prompt following on {args.check} prompts: "
              f"background colour {bg:.0%}, shape colour {fg:.0%}")
    tiny.write_checksums(out)
    print(f"total {time.perf_counter() - start:.0f} s at {args.threads} threads; weights and SHA256SUMS in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
