"""Recipe options on the tiny model: preservation, regularization images, masks, caption variants."""

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import UserError
from common.trigger import replace_trigger
from data_tools.captions import caption_variants
from data_tools.dataset import DataConfig, load_samples
from helpers import train_args
from inference.conditioning import build_inputs, predict_velocity
from inference.families import FAMILIES
from inference.generate import Generator
from trainer.cache import token_mask
from trainer.config import load_config
from trainer.recipe import run
from trainer.training_data import training_data

KLEIN = FAMILIES["klein"]


def _captioned(folder, images: dict, caption="zxq"):
    """A training folder: each name -> image, with `caption` beside it (a str, or a name -> str callable)."""
    folder.mkdir()
    for name, image in images.items():
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption(name) if callable(caption) else caption)
    return folder


def _change(transformer, embeds: torch.Tensor) -> float:
    """Mean |LoRA - base| of the velocity for a fixed noisy latent under `embeds`."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 128, 4, 4, generator=g)
    inputs = build_inputs(
        KLEIN, KLEIN.pipeline_class._pack_latents(latents), latents.shape, embeds.expand(2, -1, -1)
    )
    sigmas = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        with_lora = predict_velocity(transformer, KLEIN, inputs, sigmas, 1.0)
        transformer.disable_adapters()
        base = predict_velocity(transformer, KLEIN, inputs, sigmas, 1.0)
        transformer.enable_adapters()
    return (with_lora - base).abs().mean().item()


def test_preservation_keeps_untriggered_outputs_closer_to_the_base(
    tiny_models, sample_data, shared_cache, tmp_path
):
    common = dict(
        train__steps=30, optim__lr=3e-3, lora__rank=8, lora__alpha=8, train__caption_dropout=0.0
    )
    plain = run(
        load_config(
            None,
            train_args(
                tiny_models["klein"], sample_data, tmp_path / "plain", shared_cache, **common
            ),
        ),
        show_progress=False,
    )
    kept = run(
        load_config(
            None,
            train_args(
                tiny_models["klein"],
                sample_data,
                tmp_path / "kept",
                shared_cache,
                regularization__preserve=True,
                **common,
            )
            + ["regularization.class_prompt=a logo"],
        ),
        show_progress=False,
    )
    gen = Generator(str(tiny_models["klein"]))
    untriggered = gen.prompt_embeds(
        "a logo, a ring mark with a bar, centred, on a white background"
    )
    triggered = gen.prompt_embeds(
        "zxq logo, a ring mark with a bar, centred, on a white background"
    )
    assert _change(kept.transformer, untriggered) < 0.85 * _change(plain.transformer, untriggered)
    # it still learns
    assert _change(kept.transformer, triggered) > 0.3 * _change(plain.transformer, triggered)


def test_regularization_images_train_alongside_with_their_weight(
    tiny_models, sample_data, shared_cache, tmp_path
):
    colours = {f"logo{i}": colour for i, colour in enumerate(["blue", "green", "purple"])}
    reg = _captioned(
        tmp_path / "class",
        {n: Image.new("RGB", (64, 64), c) for n, c in colours.items()},
        lambda name: f"a {colours[name]} logo",
    )
    args = train_args(
        tiny_models["klein"],
        sample_data,
        tmp_path / "r",
        shared_cache,
        train__steps=3,
        regularization__images=reg,
        regularization__weight=0.5,
    )
    result = run(load_config(None, args), show_progress=False)
    assert result.lora_path.is_file()
    # a class image weighs regularization.weight in the loss: the same draw costs half of what it does unweighted
    from inference.loading import ModelConfig, resolve_base_model
    from trainer.cache import CacheConfig, build_features
    from trainer.flow import FlowConfig
    from trainer.step import BatchSource, Objective, TrainSettings, batch_loss

    cfg = load_config(None, args)
    data = training_data(cfg)
    weights = data.objective.sample_weights
    class_images = [
        i for i, s in enumerate(data.samples[: data.train_count]) if s.path.parent == reg
    ]
    assert len(class_images) == 3 and {weights[i] for i in class_images} == {0.5}
    assert {w for i, w in enumerate(weights) if i not in class_images} == {1.0}
    base = resolve_base_model(ModelConfig(path=str(tiny_models["klein"])))
    features = build_features(
        data.samples, base, cfg.model, CacheConfig(dir=str(shared_cache)), False
    )

    def loss(objective):
        source = BatchSource(
            features,
            data.captions,
            TrainSettings(caption_dropout=0.0),
            FlowConfig(),
            objective,
            base.family,
            torch.float32,
            torch.device("cpu"),
        )
        batch = source.draw([class_images[0]], torch.Generator().manual_seed(3))
        return batch_loss(result.transformer, base.family, batch, 1.0, 1).item()

    assert loss(data.objective) == pytest.approx(0.5 * loss(Objective()), rel=1e-6)
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(UserError, match=r"regularization.images '.*none' holds no images"):
        run(
            load_config(None, [*args, f"regularization.images={empty}", "output.overwrite=true"]),
            show_progress=False,
        )


def test_preservation_needs_a_class_prompt_and_a_trigger():
    base = ["model.path=m", "data.path=d", "regularization.preserve=true"]
    with pytest.raises(UserError, match="needs regularization.class_prompt"):
        load_config(None, [*base, "data.trigger=zxq"])
    with pytest.raises(UserError, match="data.trigger is not set"):
        load_config(None, [*base, "regularization.class_prompt=a logo"])
    assert replace_trigger("zxq logo, red, zxq", "zxq", "a logo") == "a logo logo, red, a logo"


def test_masked_loss_ignores_what_the_mask_hides(tiny_models, tmp_path, shared_cache):
    data = _captioned(
        tmp_path / "data", {str(i): Image.new("RGB", (64, 64), "red") for i in range(2)}
    )
    for i in range(2):
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (32, 0, 64, 64))  # the right half counts
        mask.save(data / f"{i}.mask.png")
    [sample] = [
        s
        for s in load_samples(DataConfig(path=str(data), masks=True), 64)
        if s.path.name == "0.png"
    ]
    tokens = token_mask(sample).view(4, 4)  # a 64 px image is 4 x 4 tokens of 16 px
    assert torch.equal(tokens, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4))
    for i in range(2):
        # everything hidden: nothing to learn
        Image.new("L", (64, 64), 0).save(data / f"{i}.mask.png")
    cfg = load_config(
        None,
        train_args(
            tiny_models["klein"],
            data,
            tmp_path / "r",
            shared_cache,
            train__steps=3,
            data__masks=True,
            train__caption_dropout=0.0,
        ),
    )
    trained = run(cfg, show_progress=False).transformer
    assert all(torch.count_nonzero(p) == 0 for n, p in trained.named_parameters() if "lora_B" in n)


def test_a_missing_or_mis_sized_mask_is_named(tiny_models, tmp_path, shared_cache):
    data = _captioned(
        tmp_path / "data", {str(i): Image.new("RGB", (64, 64), "red") for i in range(2)}
    )
    Image.new("L", (32, 32), 255).save(data / "1.mask.png")
    cfg = load_config(
        None, train_args(tiny_models["klein"], data, tmp_path / "r", shared_cache, data__masks=True)
    )
    with pytest.raises(UserError) as info:
        run(cfg, show_progress=False)
    assert "0.png' has no mask: add 0.mask.png" in str(
        info.value
    ) and "is 32x32 but its image is 64x64" in str(info.value)


def test_caption_variants_shuffle_and_drop_tags_but_keep_the_trigger():
    caption = "zxq, red mug, studio, soft light, wooden table"
    variants = caption_variants(caption, "zxq", shuffle=True, keep=1, dropout=0.3, count=8, seed=0)
    assert variants[0] == caption and len(variants) > 3
    assert all(v.startswith("zxq, ") for v in variants)
    assert any(len(v.split(",")) < 5 for v in variants)  # some tags dropped
    assert variants == caption_variants(
        caption, "zxq", shuffle=True, keep=1, dropout=0.3, count=8, seed=0
    )
    assert caption_variants(
        caption, "zxq", shuffle=False, keep=1, dropout=0.0, count=8, seed=0
    ) == (caption,)


def test_shuffled_tags_train_from_the_cache(tiny_models, tmp_path):
    data = _captioned(
        tmp_path / "data",
        {str(i): Image.new("RGB", (64, 64), "red") for i in range(2)},
        "zxq, red mug, studio, soft light, wooden table",
    )
    args = train_args(
        tiny_models["klein"],
        data,
        tmp_path / "r",
        tmp_path / "cache",
        train__steps=3,
        data__shuffle_tags=True,
        data__tag_dropout=0.2,
        data__caption_variants=4,
    )
    first = run(load_config(None, args), show_progress=False)
    assert first.text_encoder_calls > 0  # the variants were encoded once ...
    again = run(load_config(None, [*args, "output.overwrite=true"]), show_progress=False)
    assert again.text_encoder_calls == 0  # ... and come from the cache after that


def test_prepare_checks_and_carries_masks(tiny_models, shared_cache, tmp_path):
    from data_tools.prepare import prepare

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        image = Image.new("RGB", (96, 64), "blue")
        image.paste(["red", "green", "purple"][i], (0, 0, 48, 64))  # the left half is the subject
        image.save(src / f"{i}.png")
        mask = Image.new("L", (96 if i < 2 else 50, 64), 0)
        mask.paste(255, (0, 0, 48, 64))  # and its mask says so
        mask.save(src / f"{i}.mask.png")
        (src / f"{i}.txt").write_text("zxq mug")
    report = prepare(
        src, tmp_path / "out", trigger="zxq", resolution=64, fix=True, show_progress=False
    )
    # masks are not images
    assert [i["source"] for i in report["images"]] == [
        "0.png",
        "1.png",
        "2.png",
    ]
    bad = report["images"][2]
    assert not bad["kept"] and [p["code"] for p in bad["problems"]] == ["mask_size"]
    out = tmp_path / "out" / "images"
    assert sorted(p.name for p in out.iterdir()) == [
        "0000.mask.png",
        "0000.png",
        "0001.mask.png",
        "0001.png",
    ]
    # cropped to the bucket exactly as its image: the mask's white is where the subject's red is
    image, mask = Image.open(out / "0000.png"), Image.open(out / "0000.mask.png")
    assert mask.size == image.size
    red = np.asarray(image.convert("RGB"))[..., 0] > 128
    white = np.asarray(mask) > 128
    assert (red == white).mean() > 0.97  # the one resampled column at the edge may differ
    [sample] = [
        s
        for s in load_samples(DataConfig(path=str(tmp_path / "out"), masks=True), 64)
        if s.path.name == "0000.png"
    ]
    assert (
        token_mask(sample).sum() > 0 and token_mask(sample).max() == 1.0
    )  # training reads the carried mask
    cfg = load_config(
        None,
        train_args(
            tiny_models["klein"],
            tmp_path / "out",
            tmp_path / "r",
            shared_cache,
            train__steps=2,
            data__masks=True,
        ),
    )
    assert run(cfg, show_progress=False).lora_path.is_file()


def test_ema_is_saved_beside_the_lora_and_resumes_exactly(
    tiny_models, sample_data, shared_cache, tmp_path
):
    from safetensors.torch import load_file

    args = train_args(
        tiny_models["klein"],
        sample_data,
        tmp_path / "r",
        shared_cache,
        train__steps=6,
        ema__decay=0.9,
        checkpoint__every=3,
    )
    straight = run(load_config(None, args), show_progress=False)
    last = load_file(straight.lora_path)
    ema = load_file(straight.lora_path.with_name("pytorch_lora_weights_ema.safetensors"))
    assert last.keys() == ema.keys() and any(not torch.equal(last[k], ema[k]) for k in last)
    # the average lags the weights: smaller steps away from the zero-initialised lora_B
    b = [k for k in last if "lora_B" in k]
    assert sum(ema[k].abs().sum() for k in b) < sum(last[k].abs().sum() for k in b)
    gen = Generator(str(tiny_models["klein"]))
    # loads like any LoRA
    gen.add_adapter(straight.lora_path.with_name("pytorch_lora_weights_ema.safetensors"))
    resumed = run(load_config(None, [*args, "resume=latest"]), show_progress=False)
    again = load_file(resumed.lora_path.with_name("pytorch_lora_weights_ema.safetensors"))
    # the average itself is in the checkpoint
    assert all(torch.equal(ema[k], again[k]) for k in ema)


def test_validation_loss_is_fixed_and_written(tiny_models, sample_data, shared_cache, tmp_path):
    import csv

    args = train_args(
        tiny_models["klein"],
        sample_data,
        tmp_path / "r",
        shared_cache,
        train__steps=4,
        validation__split=0.34,
        validation__every=2,
    )
    run(load_config(None, args), show_progress=False)
    rows = list(csv.DictReader((tmp_path / "r" / "validation.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [2, 4] and (
        tmp_path / "r" / "validation.png"
    ).is_file()
    again = tmp_path / "again"
    run(
        load_config(
            None,
            train_args(
                tiny_models["klein"],
                sample_data,
                again,
                shared_cache,
                train__steps=4,
                validation__split=0.34,
                validation__every=2,
            ),
        ),
        show_progress=False,
    )
    # same held-out set, sigmas and noise
    assert list(csv.DictReader((again / "validation.csv").read_text().splitlines())) == rows
    with pytest.raises(UserError, match="validation.every is set but nothing is held out"):
        load_config(None, ["model.path=m", "data.path=d", "validation.every=5"])


def test_upscaled_images_are_reported_once_with_their_count(
    tiny_models, shared_cache, tmp_path, caplog
):
    sizes = [(32, 32), (48, 32), (128, 128)]
    data = _captioned(
        tmp_path / "data",
        {
            str(i): Image.new("RGB", size, ["red", "blue", "green"][i])
            for i, size in enumerate(sizes)
        },
    )
    cfg = load_config(
        None, train_args(tiny_models["klein"], data, tmp_path / "r", shared_cache, train__steps=1)
    )
    with caplog.at_level("WARNING", logger="flux2_lora.train"):
        run(cfg, show_progress=False)
    said = [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        "2 of 3 training samples are smaller than their bucket"
    )
    caplog.clear()
    several = load_config(
        None,
        train_args(
            tiny_models["klein"], data, tmp_path / "m", shared_cache, train__resolution="[64,96]"
        ),
    )
    with caplog.at_level("WARNING", logger="flux2_lora.train"):
        training_data(several)  # a sample is an image at one size, and the message says so
    said = [r.getMessage() for r in caplog.records if "upscaled" in r.getMessage()]
    assert said[0].startswith("4 of 6 training samples (3 images at 2 sizes each) are smaller")


def test_a_missing_optional_optimizer_is_named(monkeypatch):
    import importlib.metadata

    from trainer.optim import OptimConfig, optimizer_problem

    real = importlib.metadata.version

    def version(name):
        if name == "prodigyopt":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert optimizer_problem(OptimConfig(name="prodigy", lr=1.0)) == (
        "optim.name: prodigy needs prodigyopt >= 1.0, which is not installed: pip install -U 'flux2-lora[prodigy]'"
    )
