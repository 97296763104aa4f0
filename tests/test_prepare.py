"""`flux2-lora prepare` on a corpus of broken files made here (no committed binaries)."""

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.prepare import PrepareOptions, prepare
from flux2_lora import main
from helpers import train_args

RES = 128


def _png(size, colour, mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 60 + np.array(colour)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(arr).convert(mode) if mode != "RGB" else Image.fromarray(arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def make_corpus(root: Path) -> None:
    root.mkdir()
    colours = [
        (200, 40, 40),
        (40, 200, 40),
        (40, 40, 200),
        (200, 200, 40),
        (200, 40, 200),
        (40, 200, 200),
        (120, 80, 20),
        (20, 80, 120),
        (90, 90, 90),
    ]
    for i, colour in enumerate(colours):
        size = [(160, 160), (200, 150), (150, 200)][i % 3]
        (root / f"good_{i}.png").write_bytes(_png(size, colour, seed=i))
        (root / f"good_{i}.txt").write_text(f"zxq, product shot number {i}")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not an image")
    whole = _jpeg(
        Image.fromarray((np.random.default_rng(1).random((200, 200, 3)) * 255).astype(np.uint8))
    )
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "bomb.png").write_bytes(_png((700, 700), (10, 10, 10)))
    (root / "small.png").write_bytes(_png((48, 48), (255, 0, 0), seed=3))
    (root / "panorama.png").write_bytes(_png((900, 150), (0, 90, 0), seed=4))
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "rotated.jpg").write_bytes(
        _jpeg(Image.new("RGB", (200, 150), (10, 100, 10)), exif=exif)
    )
    (root / "print.jpg").write_bytes(_jpeg(Image.new("CMYK", (160, 160), (0, 80, 80, 0))))
    deep = Image.fromarray((np.arange(160 * 160).reshape(160, 160) * 2).astype(np.uint16))
    deep.save(root / "deep.png")
    Image.new("RGB", (160, 160), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "palette.png"
    )
    Image.new("RGBA", (160, 160), (255, 0, 0, 0)).save(root / "transparent.png")
    Image.new("L", (160, 160), 128).save(root / "gray.png")
    (root / "copy.png").write_bytes((root / "good_0.png").read_bytes())
    near = Image.open(root / "good_1.png").copy()
    near.putpixel((0, 0), (0, 0, 0))
    near.save(root / "near.png")
    for name, caption in [
        ("small", b""),
        ("panorama", b"zxq zxq panorama"),
        ("rotated", "caf\xe9".encode("latin-1")),
        ("print", b"a print export " + b"word " * 400),
        ("deep", b"no trigger here"),
    ]:
        (root / f"{name}.txt").write_bytes(caption)
    (root / "metadata.jsonl").write_text(
        json.dumps(
            {
                "file_name": "good_3.png",
                "text": "zxq, put the logo on the mug",
                "references": ["good_4.png", "good_5.png"],
                "instruction": "put the logo on the mug",
            }
        )
        + "\n"
        + json.dumps(
            {"file_name": "good_6.png", "text": "zxq, missing ref", "references": ["nowhere.png"]}
        )
        + "\n"
    )


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "src"
    make_corpus(root)
    return root


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    before = _digest(corpus)
    out = tmp_path_factory.mktemp("prepared") / "out"
    report = prepare(
        corpus,
        out,
        PrepareOptions(
            trigger="zxq", class_word="product", resolution=RES, fix=True, max_pixels=300_000
        ),
        show_progress=False,
    )
    assert _digest(corpus) == before  # the source is never changed
    return out, report


def _codes(report) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for image in report["images"]:
        for p in image["problems"]:
            found.setdefault(image["source"], set()).add(p["code"])
    return found


def test_every_broken_case_is_reported(prepared):
    _out, report = prepared
    codes = _codes(report)
    expected = {
        "empty.png": "zero_bytes",
        "notes.jpg": "not_an_image",
        "truncated.jpg": "corrupt",
        "bomb.png": "decompression_bomb",
        "small.png": "small",
        "panorama.png": "extreme_aspect",
        "rotated.jpg": "exif_orientation",
        "print.jpg": "cmyk",
        "deep.png": "16_bit",
        "palette.png": "palette",
        "transparent.png": "alpha",
        "gray.png": "grayscale",
        "copy.png": "exact_duplicate",
        "near.png": "near_duplicate",
    }
    for name, code in expected.items():
        assert code in codes.get(name, set()), (name, codes.get(name))
    assert {"caption_empty", "captioned"} <= codes["small.png"]
    assert "trigger_repeated" in codes["panorama.png"]
    assert "caption_not_utf8" in codes["rotated.jpg"]
    assert "caption_too_long" in codes["print.jpg"]
    assert "trigger_missing" in codes["deep.png"]
    assert "caption_missing" in codes["gray.png"]
    assert "missing_reference" in codes["good_6.png"]
    for image in report["images"]:
        for p in image["problems"]:
            assert (
                p["file"]
                and p["severity"] in {"error", "warning", "info"}
                and p["message"]
                and p["fix"]
            )
    assert report["summary"]["kept"] == sum(1 for i in report["images"] if i["kept"])
    dropped = {i["source"] for i in report["images"] if not i["kept"]}
    assert dropped == {"empty.png", "notes.jpg", "truncated.jpg", "bomb.png", "copy.png"}


def test_fixed_output_is_upright_rgb_in_its_bucket_with_clean_captions(prepared):
    import datasets

    out, report = prepared
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    by_source = {r["source"]: r for r in rows}
    for row in rows:
        with Image.open(out / row["file_name"]) as im:
            assert im.mode == "RGB" and list(im.size) == row["bucket"]
            assert all(side % 16 == 0 for side in im.size)
        assert row["text"].count("zxq") == 1
    assert by_source["panorama.png"]["text"] == "zxq panorama"
    assert by_source["deep.png"]["text"] == "zxq, no trigger here"
    assert by_source["gray.png"]["text"] == "zxq product"  # template captioner
    with Image.open(out / by_source["rotated.jpg"]["file_name"]) as im:
        assert im.height > im.width  # EXIF applied
    with Image.open(out / by_source["transparent.png"]["file_name"]) as im:
        assert im.getpixel((5, 5)) == (255, 255, 255)  # composited on the default white
    edit = by_source["good_3.png"]
    assert edit["instruction"] == "put the logo on the mug"
    assert edit["references"] == [
        by_source["good_4.png"]["file_name"],
        by_source["good_5.png"]["file_name"],
    ]
    assert "references" not in by_source["good_6.png"]
    ds = datasets.load_from_disk(str(out / "dataset"))
    assert len(ds) == len(rows) and set(ds.column_names) >= {
        "image",
        "caption",
        "width",
        "height",
        "bucket",
        "source_path",
        "sha256",
        "references",
        "instruction",
    }
    assert ds[0]["image"].size == tuple(rows[0]["bucket"])
    html = (out / "report.html").read_text()
    assert html.count("class='card") == len(report["images"]) and "data:image/jpeg;base64," in html
    assert sum(report["buckets"].values()) == len(rows)


def test_same_input_gives_byte_identical_output(corpus, prepared, tmp_path):
    out, _ = prepared
    again = tmp_path / "again"
    prepare(
        corpus,
        again,
        PrepareOptions(
            trigger="zxq",
            class_word="product",
            resolution=RES,
            fix=True,
            max_pixels=300_000,
            workers=2,
        ),
        show_progress=False,
    )
    assert _digest(again) == _digest(out)  # two worker processes change nothing either


def test_prepared_folder_trains(prepared, tiny_models, shared_cache, tmp_path, capsys):
    out, _ = prepared
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    args = train_args(
        tiny_models["klein"],
        out,
        tmp_path / "run",
        shared_cache,
        train__steps=2,
        train__resolution=RES,
    )
    assert main(["train", "--config", str(config), "--no-progress", *args]) == 0
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_zip_source_and_unfixed_copy(corpus, tmp_path):
    import zipfile

    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(corpus.glob("good_*")):
            zf.write(p, p.name)
    report = prepare(
        archive,
        tmp_path / "out",
        PrepareOptions(trigger="zxq", resolution=RES),
        show_progress=False,
    )
    assert report["source_kind"] == "zip" and report["summary"]["kept"] == 9
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()
    ]
    # without --fix the original bytes are copied
    assert (tmp_path / "out" / rows[0]["file_name"]).read_bytes() == (
        corpus / "good_0.png"
    ).read_bytes()


def test_datasets_source(tmp_path):
    import datasets

    images = [Image.new("RGB", (160, 160), (i * 20, 0, 0)) for i in range(10)]
    ds = datasets.Dataset.from_dict(
        {"image": images, "text": [f"zxq red {i}" for i in range(10)]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    report = prepare(
        tmp_path / "hf",
        tmp_path / "out",
        PrepareOptions(trigger="zxq", resolution=RES, fix=True),
        show_progress=False,
    )
    assert report["source_kind"] == "dataset" and report["summary"]["kept"] >= 1
    assert report["images"][0]["caption"] == "zxq red 0"


def test_vlm_captioner_runs_a_local_vision_language_model(corpus, tiny_models, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes((corpus / "good_0.png").read_bytes())
    report = prepare(
        src,
        tmp_path / "out",
        PrepareOptions(trigger="zxq", resolution=RES, captioner=f"vlm:{tiny_models['dev']}"),
        show_progress=False,
    )
    caption = report["images"][0]["caption"]
    assert caption.startswith("zxq") and len(caption) > len("zxq, ")
    assert "captioned" in _codes(report)["a.png"]


def test_bad_sources_fail_with_one_line_and_leave_nothing(corpus, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"")
    (broken / "b.jpg").write_text("text")
    assert main(["prepare", str(broken), "--out", str(tmp_path / "o1"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: ")
        and "none of its 2 image files can be used" in err
        and len(err.splitlines()) == 1
    )
    assert not (tmp_path / "o1").exists()

    # a failure part way (here: an unusable captioner, after images were written) leaves no half-written DIR
    src = tmp_path / "nocap"
    src.mkdir()
    (src / "a.png").write_bytes((corpus / "good_0.png").read_bytes())
    assert (
        main(
            [
                "prepare",
                str(src),
                "--out",
                str(tmp_path / "o2"),
                "--captioner",
                "vlm:/nowhere",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "is not a local model folder" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob(".o2.*"))

    assert main(["prepare", str(corpus), "--out", str(corpus / "inside"), "--no-progress"]) == 2
    assert "inside the source" in capsys.readouterr().err
    assert (
        main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o3"), "--no-progress"])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_small_dataset_gets_count_guidance(corpus, tmp_path):
    src = tmp_path / "three"
    src.mkdir()
    for i in range(3):
        (src / f"good_{i}.png").write_bytes((corpus / f"good_{i}.png").read_bytes())
    report = prepare(src, tmp_path / "out", PrepareOptions(resolution=RES), show_progress=False)
    assert any(p["code"] == "image_count" for p in report["dataset_problems"])


def test_caption_helpers():
    from data_tools.captions import dedupe_tags, normalise, replace_class_word

    assert (
        replace_class_word("a man in a hat, manly", "man", "ohwx man")
        == "a ohwx man in a hat, manly"
    )
    assert dedupe_tags("red, Mug, red, mug , studio") == "red, Mug, studio"
    assert normalise("zxq logo, zxq again", "zxq") == "zxq logo, again"
    assert normalise("a  logo", "zxq") == "zxq, a logo"
    opts = PrepareOptions(trigger="ohwx", fix=True, replace_class="man=ohwx man", dedupe_tags=True)
    assert opts.clean_caption("man, portrait, man, portrait") == "ohwx man, portrait"


def test_an_earlier_output_is_replaced_only_with_overwrite(corpus, tmp_path, capsys):
    src = tmp_path / "two"
    src.mkdir()
    for name in ("good_0.png", "good_1.png"):
        (src / name).write_bytes((corpus / name).read_bytes())
    out = tmp_path / "out"
    argv = ["prepare", str(src), "--out", str(out), "--resolution", str(RES), "--no-progress"]
    assert main(argv) == 0
    assert f"data.path={out}" in capsys.readouterr().out  # the next command is printed
    edited = out / "metadata.jsonl"
    edited.write_text(edited.read_text().replace("a photo", "hand-edited"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: --out '{out}' holds an earlier prepare output (captions edited there would be lost); "
        "pass --overwrite to replace it, or choose another folder"
    )
    assert "hand-edited" in edited.read_text()  # nothing lost
    assert main(argv + ["--overwrite"]) == 0 and "hand-edited" not in edited.read_text()


def test_exact_duplicates_keep_the_original_name(corpus, tmp_path):
    src = tmp_path / "dupes"
    src.mkdir()
    data = (corpus / "good_0.png").read_bytes()
    for name in ("IMG_4101 copy.png", "IMG_4101.png", "IMG_4101 copy 2.png"):
        (src / name).write_bytes(data)
    report = prepare(src, tmp_path / "out", resolution=RES, fix=True, show_progress=False)
    kept = [i["source"] for i in report["images"] if i["kept"]]
    assert kept == ["IMG_4101.png"]
    dropped = next(i for i in report["images"] if i["source"] == "IMG_4101 copy.png")
    assert [p["fix"] for p in dropped["problems"] if p["code"] == "exact_duplicate"] == [
        "--fix drops this copy and keeps IMG_4101.png"
    ]
