"""Evaluation data files as users download them (paper Sec. 6 benchmarks): JSON, JSONL(.gz), TSV and Hugging
Face parquet, as one file, several shards or a folder, plus locating each item's image.

Every data file read is noted (``track``), so a run folder can record which files it was made from. Parquet
image columns (``datasets``' ``{"bytes", "path"}`` structs) become lazy ``ParquetImage`` cells: the bytes are
read again, one row group at a time, when the item's batch runs.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from nvlm.eval.items import BASE64, DataError, EncodedImage, ParquetImage
from nvlm.eval.layouts import LAYOUTS

TABLES = (".json", ".jsonl", ".jsonl.gz", ".parquet", ".tsv")
_READ: ContextVar[list[Path] | None] = ContextVar("nvlm_eval_files_read", default=None)


@contextlib.contextmanager
def track() -> Iterator[list[Path]]:
    """Collect the data files read inside the block (in reading order, each once)."""
    files: list[Path] = []
    token = _READ.set(files)
    try:
        yield files
    finally:
        _READ.reset(token)


def note(path: Path) -> None:
    files = _READ.get()
    if files is not None and path not in files:
        files.append(path)


# ---- whole files ------------------------------------------------------------------------------------------
def text(path: Path) -> str:
    note(path)
    try:
        raw = path.read_bytes()
        return (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise DataError(f"{path}: cannot read the file as UTF-8 text ({exc})") from None


def load_json(path: Path) -> Any:
    try:
        return json.loads(text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def rows(files: list[Path]) -> list[tuple[str, dict]]:
    """``(where, record)`` of every record in ``files``, in order: JSONL(.gz), a JSON list, ``{"data": [...]}``,
    a JSON object of records (keyed by id), parquet, or TSV with a header row."""
    out: list[tuple[str, dict]] = []
    for path in files:
        if path.is_dir():
            raise DataError(f"{path}: is a folder; expected a data file ({', '.join(TABLES)})")
        if path.suffix == ".parquet":
            out += _parquet_rows(path)
        elif path.suffix == ".tsv":
            out += _tsv_rows(path)
        elif path.name.endswith((".jsonl", ".jsonl.gz")):
            out += _jsonl_rows(path)
        else:
            out += _json_rows(path)
    for where, rec in out:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a record (JSON object), got {type(rec).__name__}")
    return out


def _jsonl_rows(path: Path) -> list[tuple[str, Any]]:
    out = []
    for n, line in enumerate(text(path).splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    return out


def _json_rows(path: Path) -> list[tuple[str, Any]]:
    data = load_json(path)
    if isinstance(data, dict):
        data = data["data"] if isinstance(data.get("data"), list) else list(data.values())
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records")
    return [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]


def _tsv_rows(path: Path) -> list[tuple[str, dict]]:
    # VLMEvalKit's TSVs hold base64 images in one field, far above csv's default 128 KiB field limit
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    lines = text(path).splitlines(keepends=True)
    try:
        return [(f"{path}:{n}", rec) for n, rec in enumerate(csv.DictReader(lines, delimiter="\t"), 2)]
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable TSV file ({exc})") from None


def _parquet_rows(path: Path) -> list[tuple[str, dict]]:
    note(path)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        images = [f.name for f in schema if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0]
        others = [name for name in schema.names if name not in images]
        records = pf.read(columns=others).to_pylist() if others else []
        records = records or [{} for _ in range(pf.metadata.num_rows)]
        for column in images:
            for i, cell in enumerate(_image_cells(pf, column)):
                records[i][column] = ParquetImage(path, i, column) if cell is True else cell
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    return [(f"{path}[row {i}]", rec) for i, rec in enumerate(records)]


def _image_cells(pf: Any, column: str) -> Iterator[bool | str | None]:
    """Per row of an image column: True (bytes present), the stored path (no bytes), or None (no image).
    Read one row group at a time so a shard of large images never sits in memory whole."""
    for group in range(pf.num_row_groups):
        for chunk in pf.read_row_group(group, columns=[column]).column(0).chunks:
            present = chunk.is_valid().to_pylist()
            has_bytes = chunk.field("bytes").is_valid().to_pylist()
            paths = chunk.field("path").to_pylist() if chunk.type.get_field_index("path") >= 0 else None
            for i, ok in enumerate(present):
                yield True if ok and has_bytes[i] else (paths[i] if ok and paths else None)


# ---- finding files ----------------------------------------------------------------------------------------
def find(paths: list[Path], task: str, patterns: tuple[str, ...]) -> list[Path]:
    """The data files of ``paths``: a file as given; in a folder, the first glob pattern that matches."""
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
            continue
        for pattern in patterns:
            hits = sorted(p for p in path.glob(pattern) if p.is_file())
            if hits:
                files += hits
                break
        else:
            raise DataError(f"{path}: holds none of {', '.join(patterns)} (--data for {task}: {LAYOUTS[task]})")
    return list({f.resolve(): f for f in files}.values())  # a shard named twice is read once


def single(paths: list[Path], task: str) -> Path:
    """The one path of a layout that takes a single root folder or file."""
    if len(paths) != 1:
        raise DataError(f"--data for {task} takes one path in this layout, got {len(paths)}: {LAYOUTS[task]}")
    return paths[0]


# ---- fields -----------------------------------------------------------------------------------------------
def get(rec: dict, key: str, where: str) -> Any:
    if rec.get(key) is None:
        raise DataError(f"{where}: missing field {key!r}")
    return rec[key]


def answers(value: Any, where: str) -> list[str]:
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values or any(v is None for v in values):
        raise DataError(f"{where}: no answer")
    return [str(v) for v in values]


def image(value: Any, roots: list[Path], where: str) -> str | EncodedImage | ParquetImage:
    """A path (under ``roots``, or its file name alone in a flat image folder), base64, raw bytes, a
    ``{"bytes", "path"}`` struct, or a parquet cell."""
    if isinstance(value, EncodedImage | ParquetImage):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return EncodedImage(value["bytes"], where)
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise DataError(f'{where}: no image (expected a path, base64 or {{"bytes": ...}})')
    if len(value) < 1024:
        for root in roots:
            for candidate in (root / value, root / Path(value).name):
                if candidate.is_file():
                    return str(candidate)
    encoded = value.split("base64,", 1)[-1] if value.startswith("data:") else value
    if len(encoded) >= 128 and BASE64.fullmatch(encoded):
        return EncodedImage(encoded, where)
    tried = ", ".join(str(r) for r in roots)
    raise DataError(f"{where}: image {value!r} not found under {tried}")
