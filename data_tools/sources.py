"""Where a dataset comes from: a folder, a .zip, or a Hugging Face `datasets` folder (save_to_disk).

Each source lists `Entry`s cheaply (names and captions, no pixels); a worker process later calls
`read_bytes(entry)` for one image at a time, so images stream instead of sitting in memory together.

Captions: a `name.txt` or `name.caption` sidecar, else a `metadata.jsonl` / `metadata.csv` row (the format
and its parser are common/metadata.py, shared with training), else none (the captioner fills it in).
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path, PurePosixPath

from common import metadata
from common.errors import UserError
from common.images import IMAGE_EXTENSIONS

CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # path inside the source, posix style
    caption: bytes | None  # raw bytes: decoding (and its failure) is a check, not a crash
    caption_origin: str  # "sidecar", "metadata", "dataset" or "none"
    references: tuple[str, ...] = ()
    instruction: str | None = None
    mask: str | None = None  # NAME.mask.png beside the image, if the source has one


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # "folder", "zip" or "dataset"
    path: Path
    entries: tuple[Entry, ...]
    image_column: str = "image"


def _entry(name: str, sidecar: bytes | None, row: metadata.Row | None, mask: str | None) -> Entry:
    references, instruction = (row.references, row.instruction) if row else ((), None)
    if sidecar is not None:
        return Entry(name, sidecar, "sidecar", references, instruction, mask)
    if row is not None and row.text is not None:
        return Entry(name, row.text.encode("utf-8"), "metadata", references, instruction, mask)
    return Entry(name, None, "none", references, instruction, mask)


def _from_names(names: list[str], read, where: str) -> tuple[Entry, ...]:
    """Shared by folders and zips: `names` are posix paths, `read(name)` returns bytes."""
    present = set(names)
    meta = metadata.parse(lambda n: read(n) if n in present else None, where)
    entries = []
    for name in sorted(names):
        if PurePosixPath(name).suffix.lower() not in IMAGE_EXTENSIONS or name.endswith(
            metadata.MASK_SUFFIX
        ):
            continue
        stem = str(PurePosixPath(name).with_suffix(""))
        sidecar = next(
            (read(stem + ext) for ext in CAPTION_EXTENSIONS if stem + ext in present), None
        )
        mask = stem + metadata.MASK_SUFFIX
        entries.append(_entry(name, sidecar, meta.get(name), mask if mask in present else None))
    return tuple(entries)


def open_source(src: str | Path, recursive: bool = False) -> Source:
    path = Path(src)
    if not path.exists():
        raise UserError(
            f"source '{path}' does not exist; pass a folder, a .zip or a datasets folder"
        )
    if path.is_file() and path.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                names = [
                    i.filename
                    for i in zf.infolist()
                    if not i.is_dir() and not i.filename.startswith("__MACOSX/")
                ]
                return Source("zip", path, _from_names(names, zf.read, str(path)))
        except zipfile.BadZipFile:
            raise UserError(f"source '{path}' is not a readable zip file") from None
    if path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
        return _dataset_source(path)
    if path.is_dir():
        pattern = "**/*" if recursive else "*"
        names = [
            p.relative_to(path).as_posix()
            for p in path.glob(pattern)
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        return Source(
            "folder", path, _from_names(names, lambda n: (path / n).read_bytes(), str(path))
        )
    raise UserError(f"source '{path}' is neither a folder nor a .zip; pass one of those")


def _dataset_source(path: Path) -> Source:
    import datasets

    ds = datasets.load_from_disk(str(path))
    image_column = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if image_column is None:
        raise UserError(
            f"dataset '{path}' has no image column; it needs a column of type datasets.Image"
        )
    text_column = next((c for c in ("text", "caption", "prompt") if c in ds.column_names), None)
    entries = []
    texts = ds[text_column] if text_column else [None] * len(ds)
    for i, text in enumerate(texts):
        caption = None if text is None else str(text).encode("utf-8")
        entries.append(Entry(f"{i:06d}", caption, "dataset" if caption is not None else "none"))
    return Source("dataset", path, tuple(entries), image_column)


def read_bytes(source: Source, entry: Entry, name: str | None = None) -> bytes:
    """The image file's bytes, or those of `name` beside it (its mask); run in worker processes, one at a time."""
    if source.kind == "folder":
        return (source.path / (name or entry.name)).read_bytes()
    if source.kind == "zip":
        with zipfile.ZipFile(source.path) as zf:
            return zf.read(name or entry.name)
    import datasets

    ds = datasets.load_from_disk(str(source.path)).cast_column(
        source.image_column, datasets.Image(decode=False)
    )
    value = ds[int(entry.name)][source.image_column]
    if value.get("bytes"):
        return value["bytes"]
    return Path(value["path"]).read_bytes()
