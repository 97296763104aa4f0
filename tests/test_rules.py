"""Rules with one home (common/), and the callers that must agree on them: prepare, training and generate."""

import json

import pytest
from PIL import Image

from common.errors import UserError
from common.images import hex_to_rgb
from common.trigger import count_trigger, with_trigger
from data_tools.dataset import DataConfig, load_samples
from data_tools.prepare import PrepareOptions, prepare
from helpers import TRIGGER_CASES


@pytest.mark.parametrize("caption, trigger, expected", TRIGGER_CASES)
def test_trigger_rule(caption, trigger, expected):
    assert with_trigger(caption, trigger) == expected
    assert count_trigger(with_trigger(caption, trigger), trigger) == 1
    assert with_trigger(expected, trigger) == expected  # applying it twice changes nothing


def _folder(tmp_path, captions: list[str]):
    src = tmp_path / "src"
    src.mkdir()
    for i, caption in enumerate(captions):
        Image.new("RGB", (64, 64), (40 * i % 255, 90, 200 - 20 * i)).save(src / f"im{i}.png")
        (src / f"im{i}.txt").write_text(caption)
    return src


@pytest.mark.parametrize("trigger", sorted({t for _, t, _ in TRIGGER_CASES}))
def test_prepare_and_training_give_the_same_captions(trigger, tmp_path):
    cases = [(c, e) for c, t, e in TRIGGER_CASES if t == trigger]
    src = _folder(tmp_path, [c for c, _ in cases])
    trained = [s.caption for s in load_samples(DataConfig(path=str(src), trigger=trigger), 64)]
    report = prepare(
        src, tmp_path / "out", trigger=trigger, resolution=64, fix=True, show_progress=False
    )
    prepared = [img["caption"] for img in sorted(report["images"], key=lambda i: i["source"])]
    # whitespace is normalised by --fix only; the trigger placement is the same rule
    assert (
        [" ".join(t.split()) for t in trained]
        == [" ".join(e.split()) for _, e in cases]
        == prepared
    )
    retrained = [
        s.caption for s in load_samples(DataConfig(path=str(tmp_path / "out"), trigger=trigger), 64)
    ]
    assert sorted(retrained) == sorted(prepared)  # training a prepared folder adds nothing


def test_metadata_is_read_the_same_by_prepare_and_training(tmp_path):
    """One parser: references written as a JSON string (as CSV exports do) are accepted by both."""
    src = _folder(tmp_path, [])
    for name in ("target.png", "ref.png"):
        Image.new("RGB", (64, 64), "red").save(src / name)
    (src / "metadata.jsonl").write_text(
        json.dumps(
            {
                "file_name": "target.png",
                "text": "zxq mug",
                "references": '["ref.png"]',
                "instruction": "add the logo",
            }
        )
        + "\n"
    )
    [sample] = load_samples(DataConfig(path=str(src)), 64)
    assert sample.references == (src / "ref.png",) and sample.caption == "add the logo"
    report = prepare(src, tmp_path / "out", resolution=64, show_progress=False)
    target = next(i for i in report["images"] if i["source"] == "target.png")
    assert target["references"] and target["instruction"] == "add the logo"
    (src / "metadata.jsonl").write_text('{"file_name": "target.png", "references": "[oops"}\n')
    for read in (
        lambda: load_samples(DataConfig(path=str(src)), 64),
        lambda: prepare(src, tmp_path / "again", resolution=64, show_progress=False),
    ):
        with pytest.raises(UserError, match="line 1: references"):
            read()


def test_hex_colours_have_one_parser():
    assert hex_to_rgb("#e52") == hex_to_rgb("EE5522") == (238, 85, 34)
    with pytest.raises(UserError, match="--background 'blue' is not a hex code"):
        prepare("unused", "unused2", background="blue")


def test_python_api_options_are_checked_like_the_cli():
    with pytest.raises(UserError, match="prepare option 'workers' must be > 0"):
        prepare("unused", "unused2", workers=0)
    with pytest.raises(
        UserError, match="prepare option 'resolution' must be a positive multiple of 16"
    ):
        prepare("unused", "unused2", PrepareOptions(resolution=100))
    with pytest.raises(
        UserError, match="prepare option 'worker' is unknown; did you mean 'workers'"
    ):
        prepare("unused", "unused2", worker=2)
