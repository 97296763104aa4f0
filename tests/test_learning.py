"""A LoRA trained on the pretrained tiny model must learn the brand mark: the end-to-end guard.

A wrong loss target, a flipped sign, a LoRA scale that never reaches the forward pass or a conditioning
mismatch between training and inference all pass the shape-level tests; none of them passes these.
"""

import pytest
from helpers import train_args

import trainer.step
from evaluation.learning import measure
from inference.generate import Generator
from trainer.config import load_config
from trainer.recipe import run

RECIPE = dict(train__steps=120, train__batch_size=2, optim__lr=2e-3, lora__rank=8, lora__alpha=8,
              train__caption_dropout=0.0)


def _train_and_measure(model, data, out, cache):
    result = run(load_config(None, train_args(model, data, out, cache, **RECIPE)), show_progress=False)
    gen = Generator(str(model))
    gen.add_adapter(result.lora_path, name="mark")
    return measure(gen, "mark", "zxq")


@pytest.mark.parametrize("family", ["klein", "dev"])
def test_a_short_run_learns_the_mark_without_leaking(family, pretrained_models, sample_data, tmp_path):
    learned = _train_and_measure(pretrained_models[family], sample_data, tmp_path / "run", tmp_path / "cache")
    assert learned.problems() == [], learned


def test_the_guard_fails_when_the_target_sign_is_flipped(pretrained_models, sample_data, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.step, "velocity_target", lambda x0, noise: x0 - noise)
    learned = _train_and_measure(pretrained_models["klein"], sample_data, tmp_path / "run", tmp_path / "cache")
    assert any("not learned" in p for p in learned.problems()), learned
