"""Training samples from a folder of images with captions (`.txt` sidecars or `metadata.jsonl`).

Caption rules (also in docs/data.md): a sidecar `name.txt` beside `name.png` wins over a `metadata.jsonl`
line (`{"file_name": ..., "text": ...}`); an image with neither is an error, unless
`data.missing_caption: trigger`, which trains it on the trigger word alone. The trigger word is prepended
to every caption that does not already contain it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from data_tools.buckets import make_buckets, nearest_bucket
from data_tools.configtree import option, positive
from data_tools.errors import UserError
from data_tools.images import IMAGE_EXTENSIONS, oriented_size


@dataclasses.dataclass
class DataConfig:
    path: str = option("", help="folder of images + captions")
    trigger: str | None = option(None, help="word prepended to captions that lack it")
    caption_ext: str = option(".txt", help="extension of caption sidecars beside each image")
    missing_caption: Literal["error", "trigger"] = option("error", help="an image with no caption: stop, or train it on the trigger word alone")
    recursive: bool = option(False, help="also read images in sub-folders")
    repeats: int = option(1, check=positive, help="times each image appears per epoch")

    def validate(self) -> str | None:
        if not self.path:
            return "data.path is empty; set it to a folder of images with captions (try `flux2-lora sample-data DIR`)"
        if self.missing_caption == "trigger" and not self.trigger:
            return "data.missing_caption: trigger needs data.trigger to be set"
        return None


MAX_REFERENCES = 10  # FLUX.2 conditions on at most 10 images (an edit's base image counts as one)


@dataclasses.dataclass(frozen=True)
class Sample:
    path: Path
    caption: str
    width: int  # after EXIF orientation
    height: int
    bucket: tuple[int, int]  # (width, height) the image is resized and cropped to
    references: tuple[Path, ...] = ()  # conditioning images of an edit / multi-reference pair, priority order


def _read_caption(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise UserError(f"caption '{path}' is not UTF-8 (byte {exc.start}); re-save it as UTF-8") from None


def _metadata_rows(folder: Path) -> dict[str, dict]:
    """metadata.jsonl rows by file_name (a prepared dataset's lists files under images/ and their buckets)."""
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        return {}
    rows = {}
    try:
        lines = meta.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"'{meta}' is not UTF-8; re-save it as UTF-8") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[str(row["file_name"])] = row
            row["text"] = str(row["text"]).strip()
        except (ValueError, KeyError, TypeError):
            raise UserError(f"'{meta}' line {number} must be JSON with 'file_name' and 'text'") from None
    return rows


def _references(folder: Path, name: str, row: dict) -> tuple[Path, ...]:
    refs = row.get("references") or []
    if not isinstance(refs, list) or len(refs) > MAX_REFERENCES:
        raise UserError(f"'{folder / 'metadata.jsonl'}': {name} must list at most {MAX_REFERENCES} references "
                        "(file names, priority order)")
    paths = tuple(folder / str(r) for r in refs)
    for path in paths:
        if not path.is_file():
            raise UserError(f"'{folder / 'metadata.jsonl'}': reference '{path.name}' of {name} does not exist")
    return paths


def with_trigger(caption: str, trigger: str | None) -> str:
    if not trigger or trigger in caption.split() or caption.startswith(trigger):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def load_samples(cfg: DataConfig, resolution: int) -> list[Sample]:
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise UserError(f"data.path '{folder}' is not a folder; point it at your images (try `flux2-lora sample-data DIR`)")
    pattern = "**/*" if cfg.recursive else "*"
    meta = _metadata_rows(folder)
    found = {p.relative_to(folder).as_posix() for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS
             and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}
    listed = {name for name in meta if (folder / name).is_file() and Path(name).suffix.lower() in IMAGE_EXTENSIONS}
    # an image only used as another's reference (no caption of its own) is conditioning, not a target
    referenced = {str(r) for row in meta.values() for r in (row.get("references") or []) if isinstance(r, str)}
    reference_only = {n for n in found - listed if n in referenced
                      and not (folder / n).with_suffix(cfg.caption_ext).is_file()}
    images = [folder / name for name in sorted((found | listed) - reference_only)]
    if not images:
        raise UserError(f"data.path '{folder}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); add 9-50 captioned images")
    buckets = make_buckets(resolution)
    samples = []
    for image in images:
        sidecar = image.with_suffix(cfg.caption_ext)
        rel = image.relative_to(folder).as_posix()
        row = meta.get(rel, {})
        if sidecar.is_file():
            caption = _read_caption(sidecar)
        elif "text" in row:
            caption = row["text"]
        elif cfg.missing_caption == "trigger":
            caption = ""
        else:
            raise UserError(f"image '{image}' has no caption: add {sidecar.name} or a metadata.jsonl line, "
                            "or set data.missing_caption: trigger")
        references = _references(folder, rel, row)
        if references and row.get("instruction"):
            caption = str(row["instruction"]).strip()  # an edit pair trains on its instruction, as it is prompted
        width, height = oriented_size(image)
        # a bucket chosen by `flux2-lora prepare` (possibly merged) wins when it fits this resolution
        bucket = tuple(row["bucket"]) if tuple(row.get("bucket") or ()) in buckets else nearest_bucket(width, height, buckets)
        samples.append(Sample(image, with_trigger(caption, cfg.trigger), width, height, bucket, references))
    return samples * cfg.repeats
