"""Generation with adapters on the tiny models: stock-pipeline equality, scales, fusing, edits, the CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from common.errors import UserError
from common.images import hex_to_rgb, normalise_hex
from flux2_lora import main
from helpers import TRIGGER_CASES, train_args
from inference.families import FAMILIES
from inference.generate import Generator
from inference.prompts import hex_prompt, json_prompt
from inference.provenance import read_record
from trainer.config import load_config
from trainer.recipe import run


@pytest.fixture(scope="module")
def loras(tiny_models, sample_data, shared_cache, tmp_path_factory):
    out = {}
    for family in FAMILIES:
        run_dir = tmp_path_factory.mktemp(f"lora-{family}")
        cfg = load_config(
            None,
            train_args(
                tiny_models[family],
                sample_data,
                run_dir / "run",
                shared_cache,
                train__steps=20,
                optim__lr=3e-3,
                lora__alpha=6,
            ),
        )
        out[family] = run(cfg, show_progress=False).lora_path
    return out


def _arr(generated):
    return np.array(generated[0].image)


def test_generator_matches_stock_pipeline_and_scales_behave(family, tiny_models, loras):
    gen = Generator(str(tiny_models[family]))
    kw = dict(width=64, height=64, steps=3, seed=11)
    base = _arr(gen.generate("zxq logo", **kw))
    assert np.array_equal(base, _arr(gen.generate("zxq logo", **kw)))  # same seed, same picture
    info = gen.add_adapter(loras[family], scale=1.0)
    assert info.trigger == "zxq" and info.info["family"] == family
    with_lora = _arr(gen.generate("zxq logo", **kw))
    assert not np.array_equal(base, with_lora)

    stock = FAMILIES[family].pipeline_class.from_pretrained(str(tiny_models[family]))
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(loras[family].parent))
    defaults = gen.defaults
    ref = stock(
        prompt="zxq logo",
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=defaults.guidance,
        generator=[torch.Generator().manual_seed(11)],
    ).images[0]
    assert np.array_equal(np.array(ref), with_lora)

    gen.set_scales({info.name: 0.0})
    assert np.array_equal(_arr(gen.generate("zxq logo", **kw)), base)


def test_fused_equals_unfused_and_hot_swap(tiny_models, loras):
    gen = Generator(str(tiny_models["klein"]))
    info = gen.add_adapter(loras["klein"], scale=0.7)
    transformer = gen.pipe.transformer
    g = torch.Generator().manual_seed(0)
    kwargs = dict(
        hidden_states=torch.randn(1, 16, 128, generator=g),
        timestep=torch.tensor([0.5]),
        guidance=None,
        encoder_hidden_states=torch.randn(1, 512, 48, generator=g),
        txt_ids=FAMILIES["klein"].pipeline_class._prepare_text_ids(torch.zeros(1, 512, 48)),
        img_ids=FAMILIES["klein"].pipeline_class._prepare_latent_ids(torch.zeros(1, 128, 4, 4)),
        return_dict=False,
    )
    with torch.no_grad():
        unfused = transformer(**kwargs)[0]
        gen.fuse()
        fused = transformer(**kwargs)[0]
        with pytest.raises(UserError, match="unfuse"):
            gen.set_scales({info.name: 1.0})
        gen.unfuse()
        again = transformer(**kwargs)[0]
    assert (fused - unfused).abs().max() < 1e-5
    assert (again - unfused).abs().max() < 1e-5
    # hot-swap: a second adapter and removal without reloading the base
    second = gen.add_adapter(loras["klein"], scale=0.5, name="second")
    assert set(gen.adapters) == {info.name, "second"}
    gen.remove_adapter(second.name)
    with torch.no_grad():
        assert torch.allclose(transformer(**kwargs)[0], unfused, atol=1e-6)
    # permanent fusing: same numbers, plain Linear layers (no per-step LoRA cost), provenance keeps the LoRA
    gen.fuse(permanent=True)
    assert (
        type(transformer.transformer_blocks[0].attn.to_q) is torch.nn.Linear and gen.adapters == {}
    )
    with torch.no_grad():
        assert (transformer(**kwargs)[0] - unfused).abs().max() < 1e-5
    record = gen.generate("zxq", width=64, height=64, steps=1)[0].record
    assert [(r["name"], r["scale"], r["fused"]) for r in record["loras"]] == [
        (info.name, 0.7, True)
    ]


def test_edit_and_multi_reference(family, tiny_models):
    gen = Generator(str(tiny_models[family]))
    photo = Image.new("RGB", (96, 64), "#E4572E")
    logo = Image.new("RGB", (64, 64), "#1B2A49")
    edited = gen.generate(
        "make the background blue", image=photo, references=[logo, logo], steps=2, seed=1
    )
    assert edited[0].image.size == (96, 64)  # edits default to the edit image's size
    assert edited[0].record["references"] == 3 and edited[0].record["edit"]
    with pytest.raises(UserError, match="at most 10"):
        gen.generate("x", references=[logo] * 11, steps=1)
    with pytest.raises(UserError, match="too small"):
        gen.generate("x", references=[Image.new("RGB", (32, 32))], steps=1)


def test_wrong_family_and_wrong_shape_loras_are_refused(tiny_models, loras, tmp_path):
    gen = Generator(str(tiny_models["dev"]))
    with pytest.raises(UserError, match="trained on FLUX.2 klein, but the base model is dev"):
        gen.add_adapter(loras["klein"])
    state = load_file(loras["dev"])
    key = next(k for k in state if k.endswith("attn.to_q.lora_A.weight"))
    state[key] = torch.zeros(state[key].shape[0], 99)
    save_file(state, str(tmp_path / "other_size.safetensors"))
    with pytest.raises(UserError, match="does not fit this base model"):
        gen.add_adapter(tmp_path / "other_size.safetensors")
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(UserError, match="only safetensors"):
        gen.add_adapter(tmp_path / "old.ckpt")
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a valid safetensors"):
        gen.add_adapter(tmp_path / "broken.safetensors")
    assert gen.adapters == {}


def test_prompt_helpers():
    assert normalise_hex("e4572e") == "#E4572E" and normalise_hex("#e52") == "#EE5522"
    assert hex_to_rgb("#E4572E") == (228, 87, 46)
    with pytest.raises(UserError, match="not a hex code"):
        normalise_hex("#GG0000")
    assert hex_prompt("a mug", {"body": "#e4572e"}) == "a mug, body in exact colour #E4572E"
    doc = json.loads(json_prompt("studio shot", colour_palette=["#fff"], text=["SALE"]))
    assert doc["color_palette"] == ["#FFFFFF"] and doc["text"] == ['"SALE"']


def test_generate_cli_writes_provenance_results_and_grid(tiny_models, loras, tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        '{"prompt": "zxq logo", "seed": 4}\n{"prompt": 3}\n'
        '{"prompt": "zxq mug", "width": 72, "height": 64, "num_images": 2}\n{"prompt": "x", "sede": 1}\n'
    )
    out = tmp_path / "out"
    code = main(
        [
            "generate",
            "--model",
            str(tiny_models["klein"]),
            "--lora",
            f"{loras['klein']}:0.8",
            "--prompts",
            str(jobs),
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1  # two bad lines, reported with their numbers; the others ran
    assert (
        "jobs.jsonl line 2:" in err
        and "jobs.jsonl line 4: 'sede' is unknown; did you mean 'seed'?" in err
    )
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in results] == [4, 0, 1]
    assert results[1]["width"] == 64  # 72 rounded to a multiple of 16
    record = read_record(out / results[0]["file"])
    assert (
        record["ai_generated"]
        and record["loras"][0]["scale"] == 0.8
        and len(record["loras"][0]["sha256"]) == 64
    )
    assert (
        json.loads((out / results[0]["file"]).with_suffix(".json").read_text())["prompt"]
        == "zxq logo"
    )
    assert (out / "grid.png").is_file()

    single = tmp_path / "single"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_models["klein"]),
                "--prompt",
                "zxq",
                "--steps",
                "2",
                "--width",
                "64",
                "--height",
                "64",
                "--seed",
                "9",
                "--out",
                str(single),
            ]
        )
        == 0
    )
    assert read_record(single / "0000_seed9.png")["seed"] == 9


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--lora", "missing.safetensors"], "missing.safetensors' does not exist"),
        (["--ref", "nope.png"], "nope.png' cannot be read"),
    ],
)
def test_generate_cli_bad_input_is_one_line(argv_tail, message, tiny_models, tmp_path, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(tiny_models["klein"]),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "o"),
            *argv_tail,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written


def test_memory_options_generate_close_to_plain(tiny_models):
    plain = Generator(str(tiny_models["dev"]))
    low = Generator(
        str(tiny_models["dev"]), quantize="int8", group_offload="block", vae_tiling=True
    )
    kw = dict(width=64, height=64, steps=2, seed=3)
    a, b = (
        _arr(plain.generate("zxq", **kw)).astype(int),
        _arr(low.generate("zxq", **kw)).astype(int),
    )
    # int8 with per-row scales rounds weights; the picture stays the same
    assert np.abs(a - b).mean() < 8
    assert (
        type(low.pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    )
    with pytest.raises(UserError, match="needs a GPU"):
        Generator(str(tiny_models["dev"]), cpu_offload=True)


def test_other_tools_lora_format_loads_through_diffusers_converters(tiny_models, loras, tmp_path):
    """A hybrid file (`diffusion_model.` prefix, diffusers names, single blocks as linear1/linear2, no adapter
    metadata) of the same weights gives the same model as our own file. The real layouts (fused qkv, BFL names,
    kohya) are in test_lora_formats.py."""
    ours = load_file(loras["dev"])
    scale = 1.0  # alpha/rank (6/4 in the fixture) is baked into lora_B: a file without metadata loads the same
    converted = {}
    for key, tensor in ours.items():
        name = key.removeprefix("transformer.")
        name = name.replace("single_transformer_blocks.", "single_blocks.")
        name = (
            name.replace(".attn.to_qkv_mlp_proj.", ".linear1.").replace(
                ".attn.to_out.", ".linear2."
            )
            if name.startswith("single_blocks.")
            else name
        )
        converted["diffusion_model." + name] = tensor * scale if ".lora_B." in key else tensor
    save_file(converted, str(tmp_path / "comfy_style.safetensors"))

    a, b = Generator(str(tiny_models["dev"])), Generator(str(tiny_models["dev"]))
    a.add_adapter(loras["dev"])
    b.add_adapter(tmp_path / "comfy_style.safetensors")
    kw = dict(width=64, height=64, steps=2, seed=2)
    assert (
        np.abs(
            _arr(a.generate("zxq", **kw)).astype(int) - _arr(b.generate("zxq", **kw)).astype(int)
        ).max()
        <= 1
    )


def test_invisible_watermark_when_installed(tmp_path):
    pytest.importorskip("imwatermark")  # installed by the test extra; optional for users
    from imwatermark import WatermarkDecoder

    from inference.provenance import WATERMARK, save_png

    photo = Image.fromarray((np.random.default_rng(0).random((320, 320, 3)) * 255).astype(np.uint8))
    save_png(photo, tmp_path / "a.png", {"prompt": "x"})
    assert read_record(tmp_path / "a.png")["invisible_watermark"] is True
    decoded = WatermarkDecoder("bytes", len(WATERMARK) * 8).decode(
        np.array(Image.open(tmp_path / "a.png"))[:, :, ::-1], "dwtDct"
    )
    assert decoded == WATERMARK
    save_png(Image.new("RGB", (64, 64)), tmp_path / "small.png", {"prompt": "x"})
    # too small to carry it
    assert read_record(tmp_path / "small.png")["invisible_watermark"] is False


def test_add_trigger_follows_the_one_rule_fused_or_not(tiny_models, loras, tmp_path, capsys):
    gen = Generator(str(tiny_models["klein"]))
    gen.add_adapter(loras["klein"])
    kw = dict(width=64, height=64, steps=1)
    for caption, trigger, expected in TRIGGER_CASES:
        if trigger == "zxq":
            assert gen.generate(caption, add_trigger=True, **kw)[0].record["prompt"] == expected
    gen.fuse(permanent=True)  # what --fuse does: the adapter list empties, its trigger must stay
    assert gen.generate("a red mug", add_trigger=True, **kw)[0].record["prompt"] == "zxq, a red mug"

    out = tmp_path / "fused"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_models["klein"]),
                "--lora",
                str(loras["klein"].parent),
                "--fuse",
                "--add-trigger",
                "--prompt",
                "a red mug",
                "--steps",
                "1",
                "--width",
                "64",
                "--height",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "results.jsonl").read_text())["prompt"] == "zxq, a red mug"


def test_lora_scale_that_is_not_a_number_is_named(tiny_models, loras, tmp_path, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(tiny_models["klein"]),
            "--lora",
            f"{loras['klein'].parent}:high",
            "--prompt",
            "x",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        f"error: --lora '{loras['klein'].parent}:high': the scale 'high' is not a number; "
        "write FILE:0.8, or FILE alone for scale 1"
    )


def test_generator_options_are_checked_like_the_cli(tiny_models):
    with pytest.raises(
        UserError, match="Generator argument 'dtype' must be one of .*did you mean 'bfloat16'"
    ):
        Generator(str(tiny_models["klein"]), dtype="bf16")
    with pytest.raises(UserError, match="Generator argument 'group_offload' must be one of"):
        Generator(str(tiny_models["klein"]), group_offload="leaves")
