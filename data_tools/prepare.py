"""`flux2-lora prepare`: check, fix, caption and bucket a 9-50 image set into a training-ready folder.

    prepare("phone_photos/", "data/brand", PrepareOptions(trigger="zxq", fix=True))

Output (written to a temporary folder, renamed into place at the end; the source is only read):
    DIR/images/0000.png ...   the images (fixed with --fix, else the original bytes)
    DIR/metadata.jsonl        file_name, text, bucket, references, instruction: `data.path: DIR` trains on it
    DIR/dataset/              the same as a `datasets` dataset (save_to_disk)
    DIR/report.html           contact sheet, problems, bucket histogram (opens with no server)
    DIR/report.json           everything in the report, for scripts
Same input and options give byte-identical output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from common import metadata
from common.atomic import atomic_dir
from common.configtree import from_dict, option, positive
from common.errors import UserError
from common.images import decode_rgb, fit, hex_to_rgb, normalise_hex, upright_size
from common.limits import MAX_PIXELS, MAX_REFERENCES, side_problem
from common.metadata import MASK_SUFFIX
from data_tools.buckets import make_buckets, merge_small_buckets, nearest_bucket
from data_tools.captions import (
    dedupe_tags,
    make_captioner,
    normalise,
    replace_class_word,
)
from data_tools.checks import (
    ImageFacts,
    Problem,
    caption_problems,
    dataset_problems,
    inspect_image,
    look_alike,
)
from data_tools.report import write_report
from data_tools.sources import Entry, Source, open_source, read_bytes


def _replace_class_check(value: str | None) -> str | None:
    if value is None or "=" in value:
        return None
    return f"'{value}' must look like WORD=REPLACEMENT (e.g. man='ohwx man')"


@dataclasses.dataclass
class PrepareOptions:
    """`prepare`'s options: the CLI flags are generated from these fields, and the Python API checks them alike."""

    trigger: str | None = option(
        None, help="the trigger word: checked in captions, --fix puts it in exactly once"
    )
    class_word: str | None = option(None, help="for template captions: '{trigger} {class word}'")
    resolution: int = option(
        1024, check=side_problem, help="training resolution the images are checked and bucketed for"
    )
    fix: bool = option(
        False,
        help="write upright RGB images cropped to their bucket, drop exact duplicates, "
        "normalise captions",
    )
    overwrite: bool = option(
        False,
        help="replace an earlier prepare output in --out (hand-edited captions there are lost)",
    )
    captioner: str = option(
        "template",
        help="fills missing captions: template, or vlm:PATH (a local image-to-text model)",
    )
    workers: int = option(1, check=positive, help="processes that decode and check images")
    recursive: bool = option(False, help="also read images in sub-folders")
    background: str = option("#FFFFFF", help="colour transparent images are composited on")
    max_pixels: int = option(
        MAX_PIXELS, check=positive, help="refuse larger images (decompression bombs)"
    )
    batch_size: int = option(1, check=positive, help="merge buckets holding fewer images than this")
    replace_class: str | None = option(
        None,
        check=_replace_class_check,
        help="with --fix: rewrite a class word in every caption, e.g. man='ohwx man'",
    )
    dedupe_tags: bool = option(False, help="with --fix: drop repeated comma-separated tags")

    def validate(self) -> list[str]:
        try:
            normalise_hex(self.background, "--background")
        except UserError as exc:
            return [str(exc)]
        return []

    def clean_caption(self, text: str) -> str:
        """The --fix caption pipeline: class word, tags, whitespace, trigger exactly once."""
        if self.replace_class:
            word, replacement = self.replace_class.split("=", 1)
            text = replace_class_word(text, word.strip(), replacement.strip())
        if self.dedupe_tags:
            text = dedupe_tags(text)
        return normalise(text, self.trigger)


@dataclasses.dataclass
class Item:
    entry: Entry
    facts: ImageFacts
    caption: str | None = None
    bucket: tuple[int, int] | None = None
    output: str | None = None  # path inside DIR
    kept: bool = True
    references: list[str] = dataclasses.field(default_factory=list)


def _parallel(func, tasks: list, workers: int, desc: str, show: bool) -> Iterator:
    """Ordered map over processes (one task at a time per worker, so images stream)."""
    bar = tqdm(total=len(tasks), desc=desc, disable=not show)
    if workers == 1:
        for task in tasks:
            yield func(task)
            bar.update()
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(func, tasks, chunksize=1):
                yield result
                bar.update()
    bar.close()


def _inspect_task(task) -> ImageFacts:
    kind, path, column, entry, resolution, max_pixels = task
    try:
        data = read_bytes(Source(kind, Path(path), (), column), entry)
    except OSError as exc:
        facts = ImageFacts(entry.name, usable=False)
        facts.problems.append(
            Problem(
                entry.name,
                "error",
                "unreadable",
                f"cannot be read ({exc.strerror})",
                "check the file's permissions",
            )
        )
        return facts
    facts = inspect_image(entry.name, data, resolution, max_pixels)
    if entry.mask and facts.usable:
        with Image.open(
            io.BytesIO(read_bytes(Source(kind, Path(path), (), column), entry, entry.mask))
        ) as mask:
            size = upright_size(mask)
        if size != (facts.width, facts.height):
            facts.usable = False
            facts.problems.append(
                Problem(
                    entry.name,
                    "error",
                    "mask_size",
                    f"its mask {entry.mask} is "
                    f"{size[0]}x{size[1]}, the image {facts.width}x{facts.height}",
                    "export the mask at the image's size",
                )
            )
    return facts


def _write_task(task) -> None:
    kind, path, column, entry, target, fix, bucket, background = task
    source = Source(kind, Path(path), (), column)
    files = [(entry.name, Path(target))]
    if entry.mask:  # the mask goes beside its image, cropped the same way
        files.append((entry.mask, Path(target).with_name(Path(target).stem + MASK_SUFFIX)))
    for name, out in files:
        data = read_bytes(source, entry, name)
        if not fix:
            out.write_bytes(data)
            continue
        image = fit(decode_rgb(data, name, background), *bucket)
        (image.convert("L") if name == entry.mask else image).save(
            out, format="PNG", optimize=False
        )


def prepare(
    src: str | Path,
    out: str | Path,
    opts: PrepareOptions | None = None,
    show_progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """`prepare(src, out, trigger="zxq", fix=True)` or with a PrepareOptions; options are checked as the CLI's are.
    Reads: check every image → mark duplicates → check captions and references → bucket → write it all."""
    opts = from_dict(
        PrepareOptions,
        {**dataclasses.asdict(opts or PrepareOptions()), **options},
        name=lambda key: f"prepare option '{key}'",
    )
    src, out = Path(src), Path(out)
    _check_out(src, out, opts)
    source = open_source(src, opts.recursive)
    if not source.entries:
        raise UserError(f"source '{src}' holds no image files ({source.kind}); add 9-50 images")
    items = _inspect(source, opts, show_progress)
    _mark_duplicates(items, opts.fix)
    kept = [it for it in items if it.kept]
    _check_captions_and_references(kept, opts)
    assigned = {
        it.entry.name: nearest_bucket(
            it.facts.width, it.facts.height, make_buckets(opts.resolution)
        )
        for it in kept
    }
    assigned = merge_small_buckets(assigned, opts.batch_size)
    for it in kept:
        it.bucket = assigned[it.entry.name]
    with atomic_dir(out) as tmp:
        return _write(tmp, src, source, opts, items, kept, show_progress)


def _check_out(src: Path, out: Path, opts: PrepareOptions) -> None:
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise UserError(
            f"--out '{out}' is inside the source '{src}'; choose a folder outside it (the source is never changed)"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; choose a new folder")
    if out.exists() and any(out.iterdir()):
        if not (out / "report.json").is_file():
            raise UserError(
                f"--out '{out}' exists and is not an earlier prepare output; choose a new or empty folder"
            )
        if not opts.overwrite:
            raise UserError(
                f"--out '{out}' holds an earlier prepare output (captions edited there would be lost); "
                "pass --overwrite to replace it, or choose another folder"
            )


def _task_base(source: Source) -> tuple:
    """What a worker process needs to reopen the source (a Source with its entries would be pickled whole)."""
    return source.kind, str(source.path), source.image_column


def _inspect(source: Source, opts: PrepareOptions, show_progress: bool) -> list[Item]:
    tasks = [(*_task_base(source), e, opts.resolution, opts.max_pixels) for e in source.entries]
    facts = _parallel(_inspect_task, tasks, opts.workers, "checking", show_progress)
    items = [Item(e, f, kept=f.usable) for e, f in zip(source.entries, facts)]
    if not any(it.kept for it in items):
        first = items[0].facts.problems[0]
        raise UserError(
            f"source '{source.path}': none of its {len(items)} image files can be used "
            f"(e.g. {first.file}: {first.message})"
        )
    return items


def _mark_duplicates(items: list[Item], fix: bool) -> None:
    """Exact duplicates by content hash (--fix drops them), near ones by perceptual hash (reported)."""
    # the copy kept is the captioned one, then the original: "IMG_1.jpg" before "IMG_1 copy.jpg" (shortest name)
    seen: dict[str, Item] = {}
    for it in sorted(
        (it for it in items if it.kept),
        key=lambda it: (it.entry.caption is None, len(it.entry.name), it.entry.name),
    ):
        twin = seen.get(it.facts.sha256)
        if twin:
            it.facts.problems.append(
                Problem(
                    it.entry.name,
                    "warning",
                    "exact_duplicate",
                    f"identical to {twin.entry.name}",
                    f"--fix drops this copy and keeps {twin.entry.name}",
                )
            )
            it.kept = not fix
        else:
            seen[it.facts.sha256] = it
    distinct = sorted(seen.values(), key=lambda it: it.entry.name)
    for i, a in enumerate(distinct):
        for b in distinct[i + 1 :]:
            if look_alike(a.facts, b.facts):
                b.facts.problems.append(
                    Problem(
                        b.entry.name,
                        "warning",
                        "near_duplicate",
                        f"looks almost the same as {a.entry.name}",
                        "keep the better one: near copies overweight one view",
                    )
                )


def _check_captions_and_references(kept: list[Item], opts: PrepareOptions) -> None:
    names = {it.entry.name for it in kept}
    for it in kept:
        text, problems = caption_problems(
            it.entry.name, it.entry.caption, it.entry.caption_origin, opts.trigger
        )
        it.facts.problems.extend(problems)
        it.caption = opts.clean_caption(text) if (text and opts.fix) else text
        refs = list(it.entry.references)
        if len(refs) > MAX_REFERENCES:
            it.facts.problems.append(
                Problem(
                    it.entry.name,
                    "error",
                    "too_many_references",
                    f"{len(refs)} references; FLUX.2 takes at most {MAX_REFERENCES}",
                    f"keep the {MAX_REFERENCES} most important, in priority order",
                )
            )
            refs = []
        missing = [r for r in refs if r not in names]
        if missing:
            it.facts.problems.append(
                Problem(
                    it.entry.name,
                    "error",
                    "missing_reference",
                    f"reference {missing[0]} is not a usable image of this source",
                    "fix the references list in the metadata",
                )
            )
            refs = []
        it.references = refs


def _write(
    tmp: Path,
    src: Path,
    source: Source,
    opts: PrepareOptions,
    items: list[Item],
    kept: list[Item],
    show_progress: bool,
) -> dict[str, Any]:
    background = hex_to_rgb(opts.background, "--background")
    (tmp / "images").mkdir()
    for index, it in enumerate(kept):
        ext = (
            ".png"
            if opts.fix
            else (Path(it.entry.name).suffix.lower() or f".{it.facts.format.lower()}")
        )
        it.output = f"images/{index:04d}{ext}"
    write_tasks = [
        (*_task_base(source), it.entry, str(tmp / it.output), opts.fix, it.bucket, background)
        for it in kept
    ]
    for _ in _parallel(_write_task, write_tasks, opts.workers, "writing", show_progress):
        pass
    missing_captions = [it for it in kept if it.caption is None]
    if missing_captions:
        captioner = make_captioner(opts.captioner, opts.trigger, opts.class_word)
        for it in tqdm(
            missing_captions, desc=f"captioning ({captioner.name})", disable=not show_progress
        ):
            text = captioner.caption(
                decode_rgb((tmp / it.output).read_bytes(), it.output, background)
            )
            it.caption = normalise(text, opts.trigger) if opts.trigger else text
            it.facts.problems.append(
                Problem(
                    it.entry.name,
                    "info",
                    "captioned",
                    f"caption written by {captioner.name}",
                    "review it in report.html",
                )
            )
    by_name = {it.entry.name: it for it in kept}
    for it in kept:
        it.references = [by_name[r].output for r in it.references]
    _write_metadata(tmp, kept)
    _write_dataset(tmp, kept, opts.fix)
    ds_problems = dataset_problems(
        [it.facts for it in items], {it.entry.name: it.bucket for it in kept}
    )
    report = _report(src, source, opts, items, kept, ds_problems)
    (tmp / "report.json").write_text(
        json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    write_report(tmp / "report.html", report, tmp)
    return report


def _write_metadata(root: Path, kept: list[Item]) -> None:
    metadata.write_jsonl(
        root / metadata.JSONL,
        [
            metadata.Row(
                file_name=it.output,
                text=it.caption,
                references=tuple(it.references),
                instruction=it.entry.instruction,
                bucket=it.bucket,
                source=it.entry.name,
            )
            for it in kept
        ],
    )


def _write_dataset(root: Path, kept: list[Item], fixed: bool) -> None:
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "bucket": datasets.Value("string"),
            "source_path": datasets.Value("string"),
            "sha256": datasets.Value("string"),
            "references": datasets.Sequence(datasets.Value("string")),
            "instruction": datasets.Value("string"),
        }
    )
    rows = []
    for it in kept:
        data = (root / it.output).read_bytes()
        width, height = it.bucket if fixed else (it.facts.width, it.facts.height)
        rows.append(
            {
                "image": {"bytes": data, "path": it.output},
                "caption": it.caption,
                "width": width,
                "height": height,
                "bucket": f"{it.bucket[0]}x{it.bucket[1]}",
                "source_path": it.entry.name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "references": it.references,
                "instruction": it.entry.instruction,
            }
        )
    table = datasets.Dataset.from_list(rows, features=features)
    # a content fingerprint (not a random one) keeps save_to_disk byte-identical for identical input
    fingerprint = hashlib.sha256(
        json.dumps(
            [{k: v for k, v in r.items() if k != "image"} for r in rows], sort_keys=True
        ).encode()
    ).hexdigest()[:16]
    datasets.Dataset(table.data, info=table.info, fingerprint=fingerprint).save_to_disk(
        str(root / "dataset")
    )


def _report(
    src: Path,
    source: Source,
    opts: PrepareOptions,
    items: list[Item],
    kept: list[Item],
    ds_problems: list[Problem],
) -> dict[str, Any]:
    histogram: dict[str, int] = {}
    for it in kept:
        key = f"{it.bucket[0]}x{it.bucket[1]}"
        histogram[key] = histogram.get(key, 0) + 1
    problems = [p for it in items for p in it.facts.problems] + ds_problems
    return {
        # workers change how fast, never what: leaving them out keeps reports of equal input identical
        "source": str(src),
        "source_kind": source.kind,
        "options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "workers"},
        "summary": {
            "files": len(items),
            "kept": len(kept),
            "errors": sum(p.severity == "error" for p in problems),
            "warnings": sum(p.severity == "warning" for p in problems),
            "infos": sum(p.severity == "info" for p in problems),
        },
        "buckets": dict(sorted(histogram.items())),
        "dataset_problems": [p.as_dict() for p in ds_problems],
        "images": [
            {
                "source": it.entry.name,
                "output": it.output,
                "kept": it.kept,
                "caption": it.caption,
                "width": it.facts.width,
                "height": it.facts.height,
                "mode": it.facts.mode,
                "bucket": f"{it.bucket[0]}x{it.bucket[1]}" if it.bucket else None,
                "sha256": it.facts.sha256,
                "references": it.references,
                "instruction": it.entry.instruction,
                "problems": [p.as_dict() for p in it.facts.problems],
            }
            for it in items
        ],
    }
