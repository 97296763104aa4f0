"""A cached tensor never serves a run that would have computed a different one: change each input of an
embedding or a latent and count what is encoded again (and that nothing else is)."""

import inspect
import shutil

import diffusers
import pytest

from data_tools.dataset import DataConfig, load_samples
from inference.loading import ModelConfig, resolve_base_model
from trainer.cache import CacheConfig, build_features


@pytest.fixture
def model(tiny_models, tmp_path):
    return shutil.copytree(tiny_models["klein"], tmp_path / "model")


def _calls(model, data, cache, resolution=64, **settings) -> tuple[int, int]:
    config = ModelConfig(path=str(model), **settings)
    samples = load_samples(DataConfig(path=str(data), trigger="zxq"), resolution)
    f = build_features(
        samples, resolve_base_model(config), config, CacheConfig(dir=str(cache)), False
    )
    return f.text_encoder_calls, f.vae_calls


def _flip_a_middle_byte(path):
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little") + 8
    # inside the tensors, not the header: the file still loads
    middle = header + (len(data) - header) // 2
    data[middle] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_each_input_of_a_cached_tensor_is_in_its_key(model, sample_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    text, images = _calls(model, sample_data, cache)
    assert text > 0 and images > 0
    assert _calls(model, sample_data, cache) == (0, 0)  # nothing changed: nothing encoded

    # both dtypes in their keys
    assert _calls(model, sample_data, cache, dtype="bfloat16") == (
        text,
        images,
    )
    assert _calls(model, sample_data, cache, text_encoder_quantize="int8") == (text, 0)
    # other buckets: other crops
    assert _calls(model, sample_data, cache, resolution=96) == (
        0,
        images,
    )

    # same size, same header
    _flip_a_middle_byte(next((model / "text_encoder").glob("*.safetensors")))
    assert _calls(model, sample_data, cache) == (text, 0)
    _flip_a_middle_byte(next((model / "vae").glob("*.safetensors")))
    assert _calls(model, sample_data, cache) == (0, images)

    # what the pipeline wraps every prompt in
    template = model / "tokenizer" / "chat_template.jinja"
    template.write_text(template.read_text() + " ")
    assert _calls(model, sample_data, cache) == (text, 0)

    encode = diffusers.Flux2KleinPipeline.encode_prompt  # the pipeline's padding length
    signature = inspect.signature(encode)
    shorter = signature.parameters["max_sequence_length"].replace(default=256)
    monkeypatch.setattr(
        encode,
        "__signature__",
        signature.replace(
            parameters=[
                shorter if p.name == "max_sequence_length" else p
                for p in signature.parameters.values()
            ]
        ),
        raising=False,
    )
    assert _calls(model, sample_data, cache) == (text, 0)
    monkeypatch.undo()

    # its code encodes: an upgrade misses both
    monkeypatch.setattr(diffusers, "__version__", "0.99.0")
    assert _calls(model, sample_data, cache) == (text, images)
