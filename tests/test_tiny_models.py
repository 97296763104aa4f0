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


@pytest.mark.parametrize("family", ["klein", "dev"])
def test_tiny_model_cli_is_deterministic_and_loads_in_the_stock_pipeline(family, tiny_models, tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "m"), "--family", family]) == 0
    assert _digest(tmp_path / "m") == _digest(tiny_models[family])  # same seed, same bytes
    pipe = FAMILIES[family].pipeline_class.from_pretrained(str(tmp_path / "m"))
    pipe.set_progress_bar_config(disable=True)
    # text encoders keep enough layers for the pipeline's real hidden-state indices
    assert pipe.text_encoder.config.get_text_config().num_hidden_layers >= max(FAMILIES[family].text_encoder_layers)
    images = [pipe(prompt="zxq logo", height=64, width=48, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(5), output_type="np").images for _ in range(2)]
    assert images[0].shape == (1, 64, 48, 3)
    assert (images[0] == images[1]).all()


def test_distilled_klein_gets_distilled_defaults(tmp_path):
    from inference.loading import ModelConfig, resolve_base_model

    assert main(["tiny-model", str(tmp_path / "k"), "--family", "klein", "--distilled"]) == 0
    base = resolve_base_model(ModelConfig(path=str(tmp_path / "k")))
    assert base.distilled
    assert base.family.sampling_defaults(base.distilled).steps == 4
    assert base.family.sampling_defaults(False).guidance > 1


def test_real_sizes_map_to_their_licence_and_hub_id():
    klein, dev = FAMILIES["klein"], FAMILIES["dev"]
    four = klein.variant({"num_layers": 5, "joint_attention_dim": 7680})
    nine = klein.variant({"num_layers": 8, "joint_attention_dim": 12288})
    big = dev.variant({"num_layers": 8, "joint_attention_dim": 15360})
    assert four.licence == "apache-2.0" and "non-commercial" in nine.licence and "non-commercial" in big.licence
    assert four.hub_id(distilled=False) == "black-forest-labs/FLUX.2-klein-base-4B"
    assert four.hub_id(distilled=True) == "black-forest-labs/FLUX.2-klein-4B"
    assert big.hub_id(distilled=True) == "black-forest-labs/FLUX.2-dev"
    assert "custom size" in klein.variant({"num_layers": 3, "joint_attention_dim": 1}).name
