"""Train/inference agreement: what the trainer feeds the transformer equals what the stock pipeline computes.

The stock pipeline is run as an edit call with the training image as its reference, so the pipeline itself
encodes the caption (chat template, hidden layers, padding) and the image (VAE argmax, patchify,
batch-norm normalisation, packing) and builds the position ids. A forward hook captures its transformer
inputs; the trainer's cached features and id builders must equal them exactly.
"""

import inspect

import torch
from PIL import Image

from data_tools.dataset import DataConfig, load_samples
from inference.conditioning import build_inputs, predict_velocity
from inference.families import FAMILIES
from inference.loading import ModelConfig, load_pipeline, resolve_base_model
from trainer.cache import CacheConfig, build_features

CAPTION = "zxq logo, a #E4572E ring mark on a white background"


def _capture_pipeline_call(pipe, image, guidance):
    captured = {}

    def hook(module, args, kwargs, output):
        if not captured:
            captured.update({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
            captured["output"] = output[0].clone()

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(
            prompt=CAPTION,
            image=[image],
            height=image.height,
            width=image.width,
            num_inference_steps=2,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    return captured


def test_trainer_inputs_equal_pipeline_inputs(family, tiny_models, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    # 112x80 is a bucket at resolution 96 (the pipeline wants references >= 64 px a side), so neither side
    # resizes and both see the same pixels
    rng = torch.Generator().manual_seed(3)
    pixels = (torch.rand(80, 112, 3, generator=rng) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    image.save(data / "img.png")
    (data / "img.txt").write_text(CAPTION)

    base = resolve_base_model(ModelConfig(path=str(tiny_models[family])))
    samples = load_samples(DataConfig(path=str(data)), resolution=96)
    assert samples[0].bucket == (112, 80)
    features = build_features(
        samples,
        base,
        ModelConfig(path=base.path),
        CacheConfig(dir=str(tmp_path / "cache")),
        show_progress=False,
    )

    pipe = load_pipeline(base)
    # dev embeds it; klein runs CFG when > 1, whose first (conditional) call we capture
    guidance = 2.5
    seen = _capture_pipeline_call(pipe, image, guidance)

    # prompt embeddings: same text-encoder path (template, layers, 512 padding)
    embeds = features.embeds[CAPTION]
    assert embeds.shape[1] == 512
    assert torch.equal(embeds, seen["encoder_hidden_states"])
    # latents: the pipeline's reference tokens are the same image encoded the pipeline's way
    x0_tokens = base.family.pipeline_class._pack_latents(features.latents[0])
    n = x0_tokens.shape[1]
    assert torch.equal(seen["hidden_states"][:, n:], x0_tokens)
    # position ids (target at T=0, reference at T=10) and guidance input
    noisy = seen["hidden_states"][:, :n]
    ours = build_inputs(
        base.family, noisy, features.latents[0].shape, embeds, references=[features.latents[0]]
    )
    assert torch.equal(ours.img_ids, seen["img_ids"])
    assert torch.equal(ours.txt_ids, seen["txt_ids"])
    assert torch.equal(ours.hidden_states, seen["hidden_states"])
    expected_guidance = base.family.guidance_input(guidance, 1)
    if expected_guidance is None:
        assert seen["guidance"] is None
    else:
        assert torch.equal(seen["guidance"], expected_guidance)
    # and the whole forward agrees: the trainer's prediction is the pipeline's
    with torch.no_grad():
        pred = predict_velocity(pipe.transformer, base.family, ours, seen["timestep"], guidance)
    assert torch.equal(pred, seen["output"][:, :n])


def test_batched_references_share_one_id_layout(family, tiny_models):
    """Batch > 1 with references: every element gets the pipeline's ids (the transformer reads element 0's)."""
    fam = FAMILIES[family]
    target = torch.randn(3, 128, 2, 3)
    refs = [torch.randn(3, 128, 2, 2), torch.randn(3, 128, 1, 2)]
    inputs = build_inputs(
        fam,
        fam.pipeline_class._pack_latents(target),
        target.shape,
        torch.randn(3, 7, 48),
        references=refs,
    )
    single = fam.pipeline_class._prepare_image_ids([r[:1] for r in refs])[0]
    for b in range(3):
        assert torch.equal(inputs.img_ids[b, 6:], single)
        assert torch.equal(
            inputs.hidden_states[b, 6:10], fam.pipeline_class._pack_latents(refs[0])[b]
        )
    assert inputs.img_ids[0, 6:10, 0].unique().tolist() == [10]
    assert inputs.img_ids[0, 10:, 0].unique().tolist() == [20]


def test_family_layers_are_the_pipelines_defaults():
    for fam in FAMILIES.values():
        default = (
            inspect.signature(fam.pipeline_class.encode_prompt)
            .parameters["text_encoder_out_layers"]
            .default
        )
        assert tuple(default) == fam.text_encoder_layers


def test_reference_images_are_prepared_as_the_pipeline_does(family, tiny_models):
    """An odd-sized reference (not a multiple of 16) goes through the pipeline's own resize/crop/encode."""
    from inference.conditioning import Encoder

    base = resolve_base_model(ModelConfig(path=str(tiny_models[family])))
    pipe = load_pipeline(base)
    rng = torch.Generator().manual_seed(5)
    ref = Image.fromarray((torch.rand(75, 101, 3, generator=rng) * 255).to(torch.uint8).numpy())
    target = Image.new("RGB", (64, 64), "white")
    seen = {}

    def hook(module, args, kwargs, output):
        seen.setdefault("hidden_states", kwargs["hidden_states"].clone())
        seen.setdefault("img_ids", kwargs["img_ids"].clone())

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    pipe(
        prompt="x",
        image=[target, ref],
        height=64,
        width=64,
        num_inference_steps=1,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    handle.remove()
    encoder = Encoder(pipe)
    ours = [encoder.encode_reference(target), encoder.encode_reference(ref)]
    assert ours[1].shape[-2:] == (4, 6)  # 75x101 px -> 64x96 px -> 4x6 latent tokens
    n = 16  # the 64x64 target's tokens come first
    tokens = torch.cat([base.family.pipeline_class._pack_latents(r) for r in ours], dim=1)
    assert torch.equal(seen["hidden_states"][:, n:], tokens)
    ids = build_inputs(
        base.family,
        seen["hidden_states"][:, :n],
        torch.Size([1, 128, 4, 4]),
        torch.zeros(1, 512, 48),
        references=ours,
    ).img_ids
    assert torch.equal(ids, seen["img_ids"])
