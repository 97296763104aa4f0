"""A LoRA trained on the pretrained tiny model must learn the brand mark: the end-to-end guard.

A wrong loss target, a flipped sign, a LoRA scale that never reaches the forward pass or a conditioning
mismatch between training and inference all pass the shape-level tests; none of them passes these.
"""

import pytest
from helpers import train_args
from PIL import Image

import trainer.step
from evaluation.learning import measure
from inference.generate import Generator
from trainer.config import load_config
from trainer.recipe import run


@pytest.fixture(scope="module")
def brand_set(tmp_path_factory):
    """The quickstart's 12-image brand set."""
    from data_tools.sample_data import write_sample_data

    return write_sample_data(tmp_path_factory.mktemp("brand") / "set", count=12)


RECIPE = dict(train__steps=200, train__batch_size=2, optim__lr=3e-3, lora__rank=16, lora__alpha=32,
              train__caption_dropout=0.0)


def _train_and_measure(model, data, out, cache, scale=1.0):
    result = run(load_config(None, train_args(model, data, out, cache, **RECIPE)), show_progress=False)
    gen = Generator(str(model))
    gen.add_adapter(result.lora_path, name="mark")
    training = [Image.open(p) for p in sorted(data.glob("*.png"))]
    return measure(gen, "mark", "zxq", training, scale=scale), (gen, training)


# dev is not in this guard yet: its pretrained tiny model follows prompts too weakly (25 % of backgrounds) and a
# 200-step LoRA moves its colour towards the mark (ΔE 33 -> 24) but not its images towards the training set.
@pytest.mark.parametrize("family", ["klein"])
def test_a_short_run_learns_the_marks_colour(family, pretrained_models, brand_set, tmp_path):
    learned, (gen, training) = _train_and_measure(pretrained_models[family], brand_set, tmp_path / "run",
                                                  tmp_path / "cache")
    assert learned.problems() == [], learned.summary()
    if family == "klein":  # the same LoRA with its scale forced to 0 at inference is the base: nothing learned
        assert len(measure(gen, "mark", "zxq", training, scale=0.0).problems()) == 2


def test_the_guard_fails_when_the_target_sign_is_flipped(pretrained_models, brand_set, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.step, "velocity_target", lambda x0, noise: x0 - noise)
    learned, _ = _train_and_measure(pretrained_models["klein"], brand_set, tmp_path / "run", tmp_path / "cache")
    assert any("training images not learned" in p for p in learned.problems()), learned.summary()

