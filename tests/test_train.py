"""End-to-end training on the tiny models: outputs, stock-loader round trip, caching, the model card."""

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from helpers import train_args
from inference.conditioning import build_inputs
from inference.families import FAMILIES
from inference.loading import ModelConfig, load_pipeline, resolve_base_model
from trainer.config import load_config
from trainer.recipe import run


def _fixed_inputs(family, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(1, 128, 4, 4, generator=g)
    inputs = build_inputs(
        family,
        family.pipeline_class._pack_latents(target),
        target.shape,
        torch.randn(1, 512, 48, generator=g),
    )
    return inputs


def _forward(transformer, family, inputs, sigma=0.6):
    with torch.no_grad():
        return transformer(
            hidden_states=inputs.hidden_states,
            timestep=torch.tensor([sigma]),
            guidance=family.guidance_input(1.0, 1),
            encoder_hidden_states=inputs.encoder_hidden_states,
            txt_ids=inputs.txt_ids,
            img_ids=inputs.img_ids,
            return_dict=False,
        )[0]


def test_trained_lora_loads_in_stock_pipeline_with_zero_difference(
    family, tiny_models, sample_data, shared_cache, tmp_path
):
    out = tmp_path / "run"
    cfg = load_config(
        None, train_args(tiny_models[family], sample_data, out, shared_cache, lora__alpha=12)
    )
    result = run(cfg, show_progress=False)

    # the files a user gets
    assert result.lora_path == out / "pytorch_lora_weights.safetensors"
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["lora"]["alpha"] == 12 and resolved["model"]["path"] == str(tiny_models[family])
    card = (out / "README.md").read_text()
    assert "zxq" in card and "apache-2.0" in card and FAMILIES[family].pipeline_class_name in card
    with safe_open(result.lora_path, "pt") as fh:
        keys, header = list(fh.keys()), fh.metadata()
    assert keys and all(
        k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys
    )
    meta = json.loads(header["lora_adapter_metadata"])
    # alpha/r = 3 is baked into lora_B and the metadata says alpha = r: ComfyUI, which ignores the metadata,
    # then applies the same change as diffusers
    assert (
        meta["transformer.lora_alpha"] == 4
        and meta["transformer.r"] == 4
        and header["flux2_lora.alpha_baked"] == "3.0"
    )
    assert header["flux2_lora.trigger"] == "zxq"

    # the LoRA changed the model, and the stock loader reproduces the trained model exactly
    base = resolve_base_model(ModelConfig(path=str(tiny_models[family])))
    pipe = load_pipeline(base)
    inputs = _fixed_inputs(base.family)
    before = _forward(pipe.transformer, base.family, inputs)
    pipe.load_lora_weights(str(out))
    after = _forward(pipe.transformer, base.family, inputs)
    trained = _forward(result.transformer.eval(), base.family, inputs)
    assert not torch.allclose(before, trained)
    # 3 * (B A) vs (3 B) A: rounding only
    torch.testing.assert_close(after, trained, atol=1e-6, rtol=1e-6)


def test_cache_is_reused_and_text_encoder_called_once_per_caption(
    tiny_models, sample_data, tmp_path
):
    captions = {p.read_text().strip() for p in sample_data.glob("*.txt")}
    args = train_args(
        tiny_models["klein"], sample_data, tmp_path / "a", tmp_path / "cache", train__steps=1
    )
    first = run(load_config(None, args), show_progress=False)
    assert first.text_encoder_calls == len(captions) + 1  # + the empty caption for caption dropout
    assert first.vae_calls == len(list(sample_data.glob("*.png")))
    args = train_args(
        tiny_models["klein"], sample_data, tmp_path / "b", tmp_path / "cache", train__steps=1
    )
    second = run(load_config(None, args), show_progress=False)
    assert (second.text_encoder_calls, second.vae_calls) == (0, 0)
    # a changed caption misses the cache for that caption only
    edited = sorted(sample_data.glob("*.txt"))[0]
    original = edited.read_text()
    try:
        edited.write_text("zxq logo, a brand new caption")
        args = train_args(
            tiny_models["klein"], sample_data, tmp_path / "c", tmp_path / "cache", train__steps=1
        )
        third = run(load_config(None, args), show_progress=False)
    finally:
        edited.write_text(original)
    assert (third.text_encoder_calls, third.vae_calls) == (1, 0)


def test_training_reduces_the_loss_on_a_fixed_batch(
    tiny_models, sample_data, shared_cache, tmp_path
):
    """The LoRA learns: on the training data, with fixed noise and sigmas, the loss goes down."""
    from data_tools.dataset import DataConfig, load_samples
    from trainer.cache import CacheConfig, build_features
    from trainer.flow import FlowConfig
    from trainer.step import BatchSource, Objective, TrainSettings, micro_batch_loss

    base = resolve_base_model(ModelConfig(path=str(tiny_models["klein"])))
    samples = load_samples(DataConfig(path=str(sample_data), trigger="zxq"), 64)
    features = build_features(
        samples,
        base,
        ModelConfig(path=base.path),
        CacheConfig(dir=str(shared_cache)),
        show_progress=False,
    )
    source = BatchSource(
        features,
        [(s.caption,) for s in samples],
        TrainSettings(caption_dropout=0.0),
        FlowConfig(),
        Objective(),
        base.family,
        torch.float32,
        torch.device("cpu"),
    )

    def loss_of(transformer):
        total = 0.0
        with torch.no_grad():
            for i in range(len(samples)):
                g = torch.Generator().manual_seed(100 + i)
                total += micro_batch_loss(transformer, transformer, source, [i], g).item()
        return total

    before = loss_of(load_pipeline(base, text_encoder=False, vae=False).transformer)
    cfg = load_config(
        None,
        train_args(
            tiny_models["klein"],
            sample_data,
            tmp_path / "run",
            shared_cache,
            train__steps=100,
            optim__lr=3e-3,
            lora__rank=16,
            lora__alpha=16,
            train__caption_dropout=0.0,
        ),
    )
    after = loss_of(run(cfg, show_progress=False).transformer.eval())
    assert after < 0.95 * before


def test_edit_pairs_train_with_reference_tokens(tiny_models, shared_cache, tmp_path):
    """metadata.jsonl references + instruction: the trainer conditions on the references like the edit pipeline."""
    import json as _json

    from PIL import Image

    data = tmp_path / "edits"
    data.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(data / f"target_{i}.png")
        Image.new("RGB", (96, 64), (200, 40 * i, 20)).save(data / f"ref_a_{i}.png")
        refs = [f"ref_a_{i}.png"] + ([f"ref_a_{(i + 1) % 4}.png"] if i % 2 else [])
        rows.append(
            {
                "file_name": f"target_{i}.png",
                "text": "a caption",
                "references": refs,
                "instruction": f"zxq make it blue {i}",
            }
        )
    (data / "metadata.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        train_args(
            tiny_models["dev"],
            data,
            tmp_path / "run",
            shared_cache,
            train__steps=4,
            train__batch_size=2,
            train__caption_dropout=0.0,
        ),
    )
    result = run(cfg, show_progress=False)
    assert result.lora_path.is_file()
    assert result.vae_calls == 4 + 4  # 4 targets + 4 distinct reference files, each encoded once

    from data_tools.dataset import DataConfig, load_samples

    samples = load_samples(DataConfig(path=str(data)), 64)
    assert samples[1].caption == "zxq make it blue 1" and len(samples[1].references) == 2
    rows[0]["references"] = ["gone.png"]
    (data / "metadata.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    from common.errors import UserError

    with pytest.raises(UserError, match="reference 'gone.png' of target_0.png does not exist"):
        load_samples(DataConfig(path=str(data)), 64)
