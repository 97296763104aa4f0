"""The dataset metadata format, read by training and by `flux2-lora prepare` alike.

`metadata.jsonl` (one JSON object a line) or `metadata.csv` (a header row), with the columns:
    file_name     the image, relative to the folder (required)
    text          its caption
    references    conditioning images of an edit / multi-reference pair, priority order: a list of file names
                  (in CSV: a JSON list, or one file name)
    instruction   an edit pair's instruction (trained as its prompt)
    bucket        [width, height] chosen by prepare
    source        where prepare found the image (informational)
A file listed in both files takes its metadata.jsonl row. `write_jsonl` writes the format, `parse` reads it.
Beside an image NAME.png, NAME.mask.png is its loss mask (white = learn, black = ignore): never an image itself.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path

from common.errors import UserError

JSONL = "metadata.jsonl"
MASK_SUFFIX = ".mask.png"


@dataclasses.dataclass(frozen=True)
class Row:
    file_name: str
    text: str | None = None
    references: tuple[str, ...] = ()
    instruction: str | None = None
    bucket: tuple[int, int] | None = None
    source: str | None = None


def _references(value, where: str) -> tuple[str, ...]:
    if value in (None, "", []):
        return ()
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                value = json.loads(stripped)
            except ValueError:
                raise UserError(
                    f"{where}: references {value!r} is not a JSON list of file names"
                ) from None
        else:
            return (stripped,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: references must be a list of file names, got {value!r}")
    return tuple(value)


def _bucket(value, where: str) -> tuple[int, int] | None:
    if value in (None, ""):
        return None
    if isinstance(value, str) and "x" in value:
        value = value.split("x")
    try:
        width, height = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: bucket must be [width, height], got {value!r}") from None
    return width, height


def _row(data, where: str) -> Row:
    if not isinstance(data, dict) or not str(data.get("file_name") or "").strip():
        raise UserError(f"{where} must be a JSON object with 'file_name' and 'text'")
    text = data.get("text")
    return Row(
        file_name=str(data["file_name"]).strip(),
        text=None if text is None else str(text),
        references=_references(data.get("references"), where),
        instruction=(str(data["instruction"]).strip() or None) if data.get("instruction") else None,
        bucket=_bucket(data.get("bucket"), where),
        source=str(data["source"]) if data.get("source") else None,
    )


def decode_text(raw: bytes) -> str:
    """A caption or metadata file's text: UTF-8 (a byte-order mark dropped), or UTF-16 when it starts with one of
    its byte-order marks (Windows Notepad's "Unicode"). Anything else raises UnicodeDecodeError. The one rule for
    every caption we read: training, prepare and these metadata files."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16")
    return raw.decode("utf-8-sig")


def _decode(raw: bytes, where: str) -> str:
    try:
        return decode_text(raw)
    except UnicodeDecodeError as exc:
        raise UserError(f"'{where}' is not UTF-8 (byte {exc.start}); re-save it as UTF-8") from None


def parse(read: Callable[[str], bytes | None], where: str) -> dict[str, Row]:
    """Rows by file name. `read(name)` returns a metadata file's bytes or None when absent; `where` names the folder."""
    rows: dict[str, Row] = {}
    raw = read(JSONL)
    if raw is not None:
        path = f"{where}/{JSONL}"
        for number, line in enumerate(_decode(raw, path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except ValueError:
                raise UserError(
                    f"'{path}' line {number} must be JSON with 'file_name' and 'text'"
                ) from None
            row = _row(data, f"'{path}' line {number}")
            rows[row.file_name] = row
    raw = read("metadata.csv")
    if raw is not None:
        path = f"{where}/metadata.csv"
        reader = csv.DictReader(io.StringIO(_decode(raw, path)))
        if not reader.fieldnames or "file_name" not in reader.fieldnames:
            raise UserError(f"'{path}' needs a header with file_name and text columns")
        for number, data in enumerate(reader, 2):
            row = _row(data, f"'{path}' line {number}")
            rows.setdefault(row.file_name, row)
    return rows


def read_folder(folder: Path) -> dict[str, Row]:
    return parse(
        lambda name: (folder / name).read_bytes() if (folder / name).is_file() else None,
        str(folder),
    )


def write_jsonl(path: Path, rows: list[Row]) -> None:
    """One JSON object a line, keys sorted, empty fields left out (so equal rows give equal bytes)."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            data = {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(row).items()
                if v not in (None, (), [])
            }
            fh.write(json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n")
