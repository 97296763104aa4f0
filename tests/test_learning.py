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


def _train_and_measure(model, data, out, cache, scale=1.0, steps=200):
    result = run(load_config(None, train_args(model, data, out, cache, **{**RECIPE, "train__steps": steps})),
                 show_progress=False)
    gen = Generator(str(model))
    gen.add_adapter(result.lora_path, name="mark")
    training = [Image.open(p) for p in sorted(data.glob("*.png"))]
    return measure(gen, "mark", "zxq", training, scale=scale), (gen, training)


# dev's tiny base follows prompts more weakly (35 % of backgrounds against klein's 48 %) and samples without CFG:
# it gets the quickstart's 400 steps (ΔE 40 -> 23, 3.2 % mark pixels); klein learns the colour in 200 (ΔE 37 -> 17)
@pytest.mark.parametrize("family, steps", [("klein", 200), ("dev", 400)])
def test_a_short_run_learns_the_mark(family, steps, pretrained_models, brand_set, tmp_path):
    learned, (gen, training) = _train_and_measure(pretrained_models[family], brand_set, tmp_path / "run",
                                                  tmp_path / "cache", steps=steps)
    assert learned.problems() == [], learned.summary()
    # the same LoRA with its scale forced to 0 at inference is the base: no colour, no mark
    unscaled = measure(gen, "mark", "zxq", training, scale=0.0).problems()
    assert [p.split(":")[0] for p in unscaled] == ["mark colour not learned", "no mark drawn"], unscaled


def test_the_guard_fails_when_the_target_sign_is_flipped(pretrained_models, brand_set, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.step, "velocity_target", lambda x0, noise: x0 - noise)
    learned, _ = _train_and_measure(pretrained_models["klein"], brand_set, tmp_path / "run", tmp_path / "cache")
    problems = learned.problems()
    assert any(p.startswith("images moved away from the training images") for p in problems), learned.summary()

