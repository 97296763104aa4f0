"""`flux2-lora tiny-model` writes real diffusers folders that the stock pipelines load offline."""

import hashlib

import pytest
import torch

from flux2_lora import main
from inference.families import FAMILIES


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_tiny_model_cli_is_deterministic_and_loads_in_the_stock_pipeline(
    family, tiny_models, tmp_path, capsys
):
    assert main(["tiny-model", str(tmp_path / "m"), "--family", family, "--random"]) == 0
    assert _digest(tmp_path / "m") == _digest(tiny_models[family])  # same seed, same bytes
    pipe = FAMILIES[family].pipeline_class.from_pretrained(str(tmp_path / "m"))
    pipe.set_progress_bar_config(disable=True)
    # text encoders keep enough layers for the pipeline's real hidden-state indices
    assert pipe.text_encoder.config.get_text_config().num_hidden_layers >= max(
        FAMILIES[family].text_encoder_layers
    )
    images = [
        pipe(
            prompt="zxq logo",
            height=64,
            width=48,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(5),
            output_type="np",
        ).images
        for _ in range(2)
    ]
    assert images[0].shape == (1, 64, 48, 3)
    assert (images[0] == images[1]).all()


def test_distilled_klein_gets_distilled_defaults(tmp_path):
    from inference.loading import ModelConfig, resolve_base_model

    assert (
        main(["tiny-model", str(tmp_path / "k"), "--family", "klein", "--distilled", "--random"])
        == 0
    )
    base = resolve_base_model(ModelConfig(path=str(tmp_path / "k")))
    assert base.distilled
    assert base.family.sampling_defaults(base.distilled).steps == 4
    assert base.family.sampling_defaults(False).guidance > 1


def test_real_sizes_map_to_their_licence_and_hub_id():
    klein, dev = FAMILIES["klein"], FAMILIES["dev"]
    four = klein.variant({"num_layers": 5, "joint_attention_dim": 7680})
    nine = klein.variant({"num_layers": 8, "joint_attention_dim": 12288})
    big = dev.variant({"num_layers": 8, "joint_attention_dim": 15360})
    assert (
        four.licence == "apache-2.0"
        and "non-commercial" in nine.licence
        and "non-commercial" in big.licence
    )
    assert four.hub_id(distilled=False) == "black-forest-labs/FLUX.2-klein-base-4B"
    assert four.hub_id(distilled=True) == "black-forest-labs/FLUX.2-klein-4B"
    assert big.hub_id(distilled=True) == "black-forest-labs/FLUX.2-dev"
    assert "custom size" in klein.variant({"num_layers": 3, "joint_attention_dim": 1}).name


@pytest.mark.parametrize("family, shapes_right", [("klein", 2), ("dev", 0)])
def test_the_pretrained_model_draws_the_colours_it_is_asked_for(
    family, shapes_right, pretrained_models
):
    """The stock pipeline, the shipped weights: the named background colour comes out as asked (chance: 1 in 16;
    over 40 prompts klein is right 95 % of the time, dev 82 %: see <family>.build.json), and on klein the shape's
    colour too (70 %; dev's 22 % is not reliable enough to test on four prompts). Either draws a shape on every
    background: at least 3 % of the pixels are not its colour (a model that paints the background alone fails;
    measured: dev 8.7-18 %, klein 4.4-43 %)."""
    from common.synthetic import colour_counts

    pipe = FAMILIES[family].pipeline_class.from_pretrained(str(pretrained_models[family]))
    pipe.set_progress_bar_config(disable=True)
    asked = [
        ("red", "circle", "navy blue"),
        ("yellow", "square", "black"),
        ("blue", "triangle", "white"),
        ("green", "bar", "sand beige"),
    ]
    backgrounds = shapes = drawn = 0
    for colour, shape, background in asked:
        image = pipe(
            prompt=f"a {colour} {shape} on a {background} background",
            height=64,
            width=64,
            num_inference_steps=12,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]
        counts = colour_counts(image * 255)
        present = list(counts)
        backgrounds += present[0] == background
        shapes += present[1:2] == [colour]
        drawn += 1 - counts[present[0]] / sum(counts.values()) >= 0.03
    assert backgrounds >= 3 and shapes >= shapes_right and drawn == len(asked), (
        backgrounds,
        shapes,
        drawn,
    )


def test_tiny_model_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    from inference import tiny

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["tiny-model", str(tmp_path / "full"), "--family", "klein"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "already exists and is not empty" in err
        and "--overwrite" in err
        and len(err.splitlines()) == 1
    )
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"

    damaged = tmp_path / "weights"
    damaged.mkdir()
    for f in tiny.WEIGHTS_DIR.iterdir():
        damaged.joinpath(f.name).write_bytes(f.read_bytes())
    data = bytearray((damaged / "klein.safetensors").read_bytes())
    (damaged / "klein.safetensors").write_bytes(bytes(data[: len(data) // 2]))  # truncated
    monkeypatch.setattr(tiny, "WEIGHTS_DIR", damaged)
    assert main(["tiny-model", str(tmp_path / "new"), "--family", "klein"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is damaged (checksum mismatch" in err and "python scripts/pretrain_tiny.py" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "new").exists()
