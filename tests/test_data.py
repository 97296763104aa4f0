"""Minimal data input: caption sources, trigger word, EXIF orientation, buckets, batch plan."""

import json

import pytest
from PIL import Image

from common.errors import UserError
from common.images import fit, open_rgb
from common.trigger import with_trigger
from data_tools.buckets import make_buckets, nearest_bucket
from data_tools.dataset import DataConfig, load_samples
from trainer.batches import BatchPlan


def test_captions_from_sidecars_and_metadata_with_trigger(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (96, 64), "blue").save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("  a blue card  \n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "sks, blue"}) + "\n"
                                             + json.dumps({"file_name": "a.png", "text": "ignored"}) + "\n")
    with pytest.raises(UserError, match="c.png' has no caption"):
        load_samples(DataConfig(path=str(tmp_path), trigger="sks"), 64)
    samples = load_samples(DataConfig(path=str(tmp_path), trigger="sks", missing_caption="trigger"), 64)
    assert [s.caption for s in samples] == ["sks, a blue card", "sks, blue", "sks"]


def test_bad_metadata_line_is_named(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n')
    with pytest.raises(UserError, match="metadata.jsonl' line 2"):
        load_samples(DataConfig(path=str(tmp_path)), 64)


def test_trigger_is_not_repeated():
    assert with_trigger("sks dog", "sks") == "sks dog"
    assert with_trigger("a dog", "sks") == "sks, a dog"
    assert with_trigger("", "sks") == "sks"
    assert with_trigger("a dog", None) == "a dog"


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (96, 48), "white")
    image.paste((255, 0, 0), (0, 0, 48, 48))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    image.save(tmp_path / "p.jpg", exif=exif)
    (tmp_path / "p.txt").write_text("x")
    (sample,) = load_samples(DataConfig(path=str(tmp_path)), 64)
    assert (sample.width, sample.height) == (48, 96)
    assert sample.bucket[1] > sample.bucket[0]  # portrait bucket
    upright = open_rgb(sample.path)
    assert upright.size == (48, 96)
    assert upright.getpixel((24, 10))[0] > 200 and upright.getpixel((24, 10))[1] < 60  # red now on top


def test_alpha_is_composited_on_white(tmp_path):
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert open_rgb(tmp_path / "t.png").getpixel((5, 5)) == (255, 255, 255)


def test_buckets_are_multiples_of_16_with_bounded_area():
    buckets = make_buckets(1024)
    assert (1024, 1024) in buckets
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 1024 * 1024 for w, h in buckets)
    assert all(max(w / h, h / w) <= 4 for w, h in buckets)
    assert nearest_bucket(4000, 3000, buckets) in {(1184, 880), (1168, 880), (1184, 896)}
    assert nearest_bucket(3000, 4000, buckets)[1] > nearest_bucket(3000, 4000, buckets)[0]
    assert fit(Image.new("RGB", (4000, 3000)), 1184, 880).size == (1184, 880)


def test_batch_plan_keeps_buckets_apart_and_is_deterministic():
    buckets = [(64, 64)] * 5 + [(80, 48)] * 3
    plan = BatchPlan(buckets, batch_size=2, seed=1)
    epoch = plan.epoch(0)
    assert sorted(i for b in epoch for i in b) == list(range(8))
    assert all(len({buckets[i] for i in b}) == 1 for b in epoch)
    assert [plan.micro_batch(n) for n in range(10)] == [BatchPlan(buckets, 2, 1).micro_batch(n) for n in range(10)]
    assert plan.epoch(1) != plan.epoch(0) or plan.epoch(2) != plan.epoch(0)
    # two ranks see disjoint batches that together cover the single-process stream
    r0, r1 = BatchPlan(buckets, 2, 1, 2, 0), BatchPlan(buckets, 2, 1, 2, 1)
    assert [r0.micro_batch(0), r1.micro_batch(0)] == [plan.micro_batch(0), plan.micro_batch(1)]
