"""Training samples from a folder of images with captions (`.txt` sidecars or `metadata.jsonl`).

Caption rules (also in docs/data.md): a sidecar `name.txt` beside `name.png` wins over a `metadata.jsonl`
line (`{"file_name": ..., "text": ...}`, format in common/metadata.py); an image with neither is an error,
unless `data.missing_caption: trigger`, which trains it on the trigger word alone. Every caption gets the
trigger word exactly once (the rule in common/trigger.py, shared with prepare and generate).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from common import metadata
from common.configtree import non_negative, option, positive, probability
from common.errors import UserError
from common.images import IMAGE_EXTENSIONS, check_image
from common.limits import MAX_REFERENCES
from common.metadata import MASK_SUFFIX, Row, decode_text
from common.trigger import with_trigger
from data_tools.buckets import (
    make_buckets,
    merge_small_buckets,
    nearest_bucket,
    upscale_factor,
)


@dataclasses.dataclass
class DataConfig:
    path: str = option("", help="folder of images + captions")
    trigger: str | None = option(None, help="word prepended to captions that lack it")
    caption_ext: str = option(".txt", help="extension of caption sidecars beside each image")
    missing_caption: Literal["error", "trigger"] = option(
        "error", help="an image with no caption: stop, or train it on the trigger word alone"
    )
    recursive: bool = option(False, help="also read images in sub-folders")
    repeats: int = option(1, check=positive, help="times each image appears per epoch")
    masks: bool = option(
        False,
        help="masked loss: NAME.mask.png beside each image (white = learn, black = ignore, "
        "grey = in between), the same size as the image",
    )
    shuffle_tags: bool = option(
        False,
        help="shuffle a caption's comma-separated tags (the first keep_tags and the "
        "trigger stay in place)",
    )
    keep_tags: int = option(1, check=non_negative, help="leading tags shuffle_tags leaves in place")
    tag_dropout: float = option(
        0.0, check=probability, help="chance each other tag is left out of a caption"
    )
    caption_variants: int = option(
        8,
        check=positive,
        help="caption variants per image when tags are shuffled or "
        "dropped (each is encoded once and cached)",
    )

    def validate(self) -> list[str]:
        problems = []
        if not self.path:
            problems.append(
                "data.path is empty; set it to a folder of images with captions "
                "(try `flux2-lora sample-data DIR`)"
            )
        if self.missing_caption == "trigger" and not self.trigger:
            problems.append("data.missing_caption: trigger needs data.trigger to be set")
        return problems


@dataclasses.dataclass(frozen=True)
class Sample:
    path: Path
    caption: str
    width: int  # after EXIF orientation
    height: int
    bucket: tuple[int, int]  # (width, height) the image is resized and cropped to
    # conditioning images of an edit / multi-reference pair, priority order
    references: tuple[Path, ...] = ()
    mask: Path | None = None  # NAME.mask.png with data.masks: which pixels the loss counts


def _read_caption(path: Path) -> str:
    try:
        return decode_text(path.read_bytes()).strip()
    except UnicodeDecodeError as exc:
        raise UserError(
            f"caption '{path}' is not UTF-8 (byte {exc.start}); re-save it as UTF-8"
        ) from None


def _references(folder: Path, name: str, row: Row | None) -> tuple[Path, ...]:
    refs = row.references if row else ()
    if len(refs) > MAX_REFERENCES:
        raise UserError(
            f"'{folder / 'metadata.jsonl'}': {name} lists {len(refs)} references; FLUX.2 takes at most "
            f"{MAX_REFERENCES} (file names, priority order)"
        )
    paths = tuple(folder / r for r in refs)
    for path in paths:
        if not path.is_file():
            raise UserError(
                f"'{folder / 'metadata.jsonl'}': reference '{path.name}' of {name} does not exist"
            )
    return paths


def load_samples(
    cfg: DataConfig, resolution: int | Sequence[int], batch_size: int = 1, key: str = "data.path"
) -> list[Sample]:
    """Every image as a Sample, once per training resolution (multi-resolution training), bucketed on that
    resolution's grid, buckets too small for `batch_size` merged; repeated `data.repeats` times."""
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise UserError(
            f"{key} '{folder}' is not a folder; point it at your images (try `flux2-lora sample-data DIR`)"
        )
    pattern = "**/*" if cfg.recursive else "*"
    meta = metadata.read_folder(folder)
    found = {
        p.relative_to(folder).as_posix()
        for p in folder.glob(pattern)
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not p.name.endswith(MASK_SUFFIX)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }
    listed = {
        name
        for name in meta
        if (folder / name).is_file() and Path(name).suffix.lower() in IMAGE_EXTENSIONS
    }
    # an image only used as another's reference (no caption of its own) is conditioning, not a target
    referenced = {r for row in meta.values() for r in row.references}
    reference_only = {
        n
        for n in found - listed
        if n in referenced and not (folder / n).with_suffix(cfg.caption_ext).is_file()
    }
    images = [folder / name for name in sorted((found | listed) - reference_only)]
    if not images:
        raise UserError(
            f"{key} '{folder}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); add captioned images"
        )
    read, problems = [], []
    for image in images:
        try:
            read.append(_sample(folder, image, meta.get(image.relative_to(folder).as_posix()), cfg))
        except UserError as exc:  # every image is checked, so one run reports every problem
            problems.append(str(exc))
    if problems:
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise UserError(
            f"{key} '{folder}': {len(problems)} of {len(images)} images cannot be trained on: {shown}. "
            f"`flux2-lora prepare {folder} --out DIR` checks them all and fixes what it can"
        )
    samples = []
    for res in [resolution] if isinstance(resolution, int) else resolution:
        buckets = make_buckets(res)
        # a bucket chosen by `flux2-lora prepare` (possibly merged) wins when it is on this resolution's grid
        assigned = {
            i: chosen if chosen in buckets else nearest_bucket(s.width, s.height, buckets)
            for i, (s, chosen) in enumerate(read)
        }
        assigned = merge_small_buckets(assigned, batch_size)
        samples += [dataclasses.replace(s, bucket=assigned[i]) for i, (s, _) in enumerate(read)]
    return samples * cfg.repeats


def upscaled(samples: list[Sample]) -> list[Sample]:
    """Samples whose image is smaller than its bucket, so training enlarges it (softer than the rest)."""
    return [s for s in samples if upscale_factor(s.width, s.height, s.bucket) > 1.0]


def _sample(
    folder: Path, image: Path, row: Row | None, cfg: DataConfig
) -> tuple[Sample, tuple[int, int] | None]:
    """The sample (its bucket not chosen yet) and the bucket prepare chose for it, if any."""
    sidecar = image.with_suffix(cfg.caption_ext)
    if sidecar.is_file():
        caption = _read_caption(sidecar)
    elif row is not None and row.text is not None:
        caption = row.text.strip()
    elif cfg.missing_caption == "trigger":
        caption = ""
    else:
        raise UserError(
            f"image '{image}' has no caption: add {sidecar.name} or a metadata.jsonl line, "
            "or set data.missing_caption: trigger"
        )
    references = _references(folder, image.relative_to(folder).as_posix(), row)
    if references and row.instruction:
        caption = row.instruction  # an edit pair trains on its instruction, as it is prompted
    width, height = check_image(image)
    mask = image.with_name(image.stem + MASK_SUFFIX) if cfg.masks else None
    if mask is not None:
        if not mask.is_file():
            raise UserError(
                f"image '{image}' has no mask: add {mask.name} (white = learn, black = ignore), "
                "or set data.masks: false"
            )
        if check_image(mask) != (width, height):
            raise UserError(
                f"mask '{mask}' is {'x'.join(map(str, check_image(mask)))} but its image is "
                f"{width}x{height}; masks must match their image"
            )
    sample = Sample(
        image, with_trigger(caption, cfg.trigger), width, height, (width, height), references, mask
    )
    return sample, row.bucket if row else None
