"""GPU placement proven on the CPU: the training device is stood in for by PyTorch's `meta` device (shapes only,
no data). A component left on the CPU while the transformer runs on the device fails at once, as it would on a GPU;
when everything is placed on one device, the run gets through every model call and only stops where pixels would be
copied out (meta tensors have no data)."""

import traceback
from pathlib import Path

import pytest
import torch

from inference.loading import ModelConfig, load_pipeline, resolve_base_model
from trainer.samples import SampleConfig, SampleRenderer


def _render_on_meta(tiny_models, family: str, renderer_device: str) -> BaseException:
    base = resolve_base_model(ModelConfig(path=str(tiny_models[family])))
    # "the GPU"
    transformer = load_pipeline(base, text_encoder=False, vae=False).transformer.to("meta")
    width = 3 * 16  # the tiny models' joint_attention_dim
    embeds = {"a zxq logo": torch.zeros(1, 512, width), "": torch.zeros(1, 512, width)}
    renderer = SampleRenderer(
        base,
        "float32",
        SampleConfig(prompts=["a zxq logo"], steps=2),
        embeds,
        64,
        Path("unused"),
        device=renderer_device,
    )
    with pytest.raises(Exception) as info:
        renderer.render(transformer)
    return info.value


def test_training_samples_run_every_model_call_on_the_training_device(family, tiny_models):
    error = _render_on_meta(tiny_models, family, "meta")
    frames = "".join(traceback.format_tb(error.__traceback__))
    # Where a shapes-only run has to stop, after every transformer call: klein gets through VAE decoding to the
    # copy into a PIL image; dev's pipeline first reads position ids as numbers to unpack the latents (`.item()`)
    stops = {
        "klein": ("Cannot copy out of meta tensor", "postprocess"),
        "dev": ("Tensor.item() cannot be called on meta tensors", "_unpack_latents_with_ids"),
    }[family]
    assert stops[0] in str(error) and stops[1] in frames, frames[-2000:]


def test_a_component_left_on_the_cpu_is_caught(tiny_models):
    """What the old renderer did (VAE + scheduler pipeline on the CPU, transformer on the GPU): it fails here too."""
    error = _render_on_meta(tiny_models, "klein", "cpu")
    assert isinstance(error, RuntimeError) and "is not on the expected device meta" in str(error)


def test_auto_placement_picks_the_gpu_and_bf16_when_there_is_one(monkeypatch):
    from inference.generate import resolve_placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_placement("auto", "auto") == ("cpu", "float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_placement("auto", "auto") == ("cuda", "bfloat16")
    assert resolve_placement("cuda:1", "float16") == ("cuda:1", "float16")


def _stops_where_pixels_are_copied_out(error: BaseException, family: str) -> bool:
    """Every model call ran on the stand-in device; the run only stopped where data has to leave it."""
    frames = "".join(traceback.format_tb(error.__traceback__))
    if family == "klein":
        return "Cannot copy out of meta tensor" in str(error) and "postprocess" in frames
    return (
        "Tensor.item() cannot be called on meta tensors" in str(error)
        and "_unpack_latents_with_ids" in frames
    )


def _meta_embeds(monkeypatch):
    """Prompt embeddings as the GPU text encoder would hand them over (a causal mask reads data, so the text encoder
    itself cannot run shapes-only)."""
    from inference.generate import Generator

    monkeypatch.setattr(
        Generator, "prompt_embeds", lambda self, prompt: torch.zeros(1, 512, 48, device="meta")
    )


@pytest.mark.parametrize("mode", ["t2i", "edit", "references"])
def test_generate_runs_every_model_call_on_the_declared_device(
    family, mode, tiny_models, monkeypatch
):
    from PIL import Image

    from inference.generate import Generator

    _meta_embeds(monkeypatch)
    gen = Generator(str(tiny_models[family]), device="meta", dtype="float32")
    photo = Image.new("RGB", (64, 64), "#E4572E")
    extra = {"t2i": {}, "edit": {"image": photo}, "references": {"references": [photo, photo]}}[
        mode
    ]
    with pytest.raises(Exception) as info:
        gen.generate("a zxq logo", width=64, height=64, steps=2, **extra)
    assert _stops_where_pixels_are_copied_out(info.value, family), info.value


def test_evaluate_places_its_generator_on_the_declared_device(tiny_models, monkeypatch, tmp_path):
    from evaluation.evaluate import Adapter, evaluate
    from evaluation.suites import load_suite
    from inference.families import FAMILIES
    from inference.lora_io import save_lora
    from inference.tiny import build_tiny_pipeline
    from trainer.lora import LoraSettings, add_lora

    transformer = build_tiny_pipeline(FAMILIES["klein"]).transformer
    add_lora(transformer, LoraSettings(rank=4, alpha=4), seed=0)
    save_lora(
        tmp_path / "l.safetensors",
        transformer,
        FAMILIES["klein"],
        {"family": "klein", "trigger": "zxq"},
    )
    _meta_embeds(monkeypatch)
    with pytest.raises(Exception) as info:
        evaluate(
            str(tiny_models["klein"]),
            [Adapter("l", tmp_path / "l.safetensors")],
            load_suite("quickstart"),
            tmp_path / "eval",
            show_progress=False,
            device="meta",
            dtype="float32",
            steps=2,
            seeds=1,
        )
    assert _stops_where_pixels_are_copied_out(info.value, "klein"), info.value
    assert not (tmp_path / "eval").exists()


def test_before_after_grid_runs_on_the_training_device(family, tiny_models):
    from trainer.lora import LoraSettings, add_lora

    base = resolve_base_model(ModelConfig(path=str(tiny_models[family])))
    transformer = load_pipeline(base, text_encoder=False, vae=False).transformer
    add_lora(transformer, LoraSettings(rank=4, alpha=4), seed=0)
    transformer.to("meta")
    embeds = {"a zxq logo": torch.zeros(1, 512, 48), "": torch.zeros(1, 512, 48)}
    renderer = SampleRenderer(
        base,
        "float32",
        SampleConfig(prompts=["a zxq logo"], steps=2),
        embeds,
        64,
        Path("unused"),
        device="meta",
    )
    with pytest.raises(Exception) as info:
        renderer.before_after(transformer, 5)
    assert _stops_where_pixels_are_copied_out(info.value, family), info.value


def test_cpu_runs_pick_a_dtype_that_fits_this_machine(tiny_models, caplog, monkeypatch):
    import common.machine
    from inference.generate import cpu_dtype

    monkeypatch.setattr(common.machine, "detected_ram", lambda: 24.0)  # this project's machines
    from inference.loading import ModelConfig, resolve_base_model

    assert cpu_dtype(resolve_base_model(ModelConfig(path=str(tiny_models["klein"])))) == "float32"
    real = resolve_base_model(
        ModelConfig(path="black-forest-labs/FLUX.2-klein-base-4B")
    )  # shipped configs
    with caplog.at_level("WARNING", logger="flux2_lora.generate"):
        assert cpu_dtype(real) == "bfloat16"  # ~30 GiB in float32: more than 24
    assert "float32 would need 30 GiB" in caplog.text
