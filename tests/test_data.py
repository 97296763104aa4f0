"""Minimal data input: caption sources, trigger word, EXIF orientation, buckets, batch plan."""

import json

import pytest
from PIL import Image

from common.errors import UserError
from common.images import fit, open_rgb
from common.trigger import with_trigger
from data_tools.buckets import bucket_step, make_buckets, nearest_bucket
from data_tools.dataset import DataConfig, load_samples
from trainer.batches import BatchPlan


def test_captions_from_sidecars_and_metadata_with_trigger(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (96, 64), "blue").save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("  a blue card  \n")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "b.png", "text": "sks, blue"})
        + "\n"
        + json.dumps({"file_name": "a.png", "text": "ignored"})
        + "\n"
    )
    with pytest.raises(UserError, match="c.png' has no caption"):
        load_samples(DataConfig(path=str(tmp_path), trigger="sks"), 64)
    samples = load_samples(
        DataConfig(path=str(tmp_path), trigger="sks", missing_caption="trigger"), 64
    )
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
    # red now on top
    assert upright.getpixel((24, 10))[0] > 200 and upright.getpixel((24, 10))[1] < 60


def test_alpha_is_composited_on_white(tmp_path):
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert open_rgb(tmp_path / "t.png").getpixel((5, 5)) == (255, 255, 255)


def test_buckets_lie_on_a_grid_of_a_sixteenth_of_the_resolution_with_bounded_area():
    assert [bucket_step(r) for r in (64, 256, 512, 768, 1024, 2048)] == [16, 16, 32, 48, 64, 128]
    buckets = make_buckets(1024)
    assert (1024, 1024) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 for w, h in buckets)
    assert all(max(w / h, h / w) <= 4 for w, h in buckets)
    assert nearest_bucket(4000, 3000, buckets) == (1152, 896)
    assert nearest_bucket(3000, 4000, buckets) == (896, 1152)
    assert fit(Image.new("RGB", (4000, 3000)), 1152, 896).size == (1152, 896)


def test_real_photo_sizes_form_full_batches(tmp_path):
    """Phone and camera photos of slightly different sizes must share buckets, so batch_size 4 means 4."""
    sizes = [
        (4032, 3024),
        (4000, 3000),
        (3024, 4032),
        (3000, 4000),
        (4080, 3060),
        (1920, 1080),
        (1080, 1920),
        (2048, 1536),
        (3264, 2448),
        (2448, 3264),
        (1600, 1200),
        (4032, 2268),
    ]
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w // 8, h // 8), "gray").save(tmp_path / f"p{i:02d}.jpg")
        (tmp_path / f"p{i:02d}.txt").write_text("a photo")
    samples = load_samples(DataConfig(path=str(tmp_path)), 128, batch_size=4)
    plan = BatchPlan([s.bucket for s in samples], 4, seed=0)
    assert plan.batch_sizes() == {4: 3}  # 12 images in 3 full batches
    # without merging, the 16-px-era problem shows
    alone = load_samples(DataConfig(path=str(tmp_path)), 128)
    assert len({s.bucket for s in alone}) > 3


def test_multi_resolution_trains_every_image_at_each_size(tmp_path):
    for i in range(3):
        Image.new("RGB", (96, 64), "blue").save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("x")
    samples = load_samples(DataConfig(path=str(tmp_path)), [64, 128])
    assert len(samples) == 6 and {s.bucket[0] * s.bucket[1] <= 64 * 64 for s in samples[:3]} == {
        True
    }
    assert all(64 * 64 < s.bucket[0] * s.bucket[1] <= 128 * 128 for s in samples[3:])


def test_batch_plan_keeps_buckets_apart_and_is_deterministic():
    buckets = [(64, 64)] * 5 + [(80, 48)] * 3
    plan = BatchPlan(buckets, batch_size=2, seed=1)
    epoch = plan.epoch(0)
    assert sorted(i for b in epoch for i in b) == list(range(8))
    assert all(len({buckets[i] for i in b}) == 1 for b in epoch)
    assert [plan.micro_batch(n) for n in range(10)] == [
        BatchPlan(buckets, 2, 1).micro_batch(n) for n in range(10)
    ]
    assert plan.epoch(1) != plan.epoch(0) or plan.epoch(2) != plan.epoch(0)
    # two ranks see disjoint batches that together cover the single-process stream
    r0, r1 = BatchPlan(buckets, 2, 1, 2, 0), BatchPlan(buckets, 2, 1, 2, 1)
    assert [r0.micro_batch(0), r1.micro_batch(0)] == [plan.micro_batch(0), plan.micro_batch(1)]
