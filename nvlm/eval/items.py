"""What a benchmark reader returns (``nvlm eval run``, paper Sec. 6 evaluation): ``Item``, its images, and
``DataError``.

An item's images are file paths (``str``) or an object with ``load() -> bytes`` and ``where``: ``EncodedImage``
(base64 or raw bytes held in memory) or ``ParquetImage`` (a cell of a Hugging Face parquet shard, read when its
batch runs, so a 30 GB VQAv2 release never sits in memory at once). The runner decodes them all through the
safe loader ``nvlm.vision.image_io.load_image``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


class DataError(ValueError):
    """--data is missing or malformed; the message names the file (and the item where it can)."""


@dataclass
class EncodedImage:
    """An image stored inline in the data file: base64 text (JSON exports) or raw bytes."""

    data: str | bytes
    where: str

    def load(self) -> bytes:
        if isinstance(self.data, bytes):
            return self.data
        try:
            return base64.b64decode("".join(self.data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise DataError(f"{self.where}: image is neither a file nor valid base64") from None

    def identity(self) -> str:
        data = self.data if isinstance(self.data, bytes) else self.data.encode()
        return hashlib.sha256(data).hexdigest()[:16]


_ROW_GROUP: dict[tuple[str, str, int], list[Any]] = {}  # the one row group last read (items come in order)


@dataclass
class ParquetImage:
    """The ``column`` cell (a ``{"bytes", "path"}`` struct, ``datasets``' Image feature) of ``row`` in ``file``."""

    file: Path
    row: int
    column: str

    @property
    def where(self) -> str:
        return f"{self.file}[row {self.row}][{self.column}]"

    def load(self) -> bytes:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(self.file)
        start = 0
        for group in range(pf.num_row_groups):
            size = pf.metadata.row_group(group).num_rows
            if self.row < start + size:
                break
            start += size
        else:
            raise DataError(f"{self.where}: the file has only {start} rows (was it replaced during the run?)")
        key = (str(self.file), self.column, group)
        if key not in _ROW_GROUP:
            _ROW_GROUP.clear()
            cells = pf.read_row_group(group, columns=[self.column]).column(0).to_pylist()
            _ROW_GROUP[key] = [c.get("bytes") if isinstance(c, dict) else None for c in cells]
        data = _ROW_GROUP[key][self.row - start]
        if not data:
            raise DataError(f"{self.where}: no image bytes")
        return data

    def identity(self) -> str:
        return f"{self.file.name}:{self.row}:{self.column}"


@dataclass
class Item:
    id: str
    prompt: str | list[dict[str, str]]  # raw text to complete, or chat messages (rendered by the runner)
    images: list[Any] = field(default_factory=list)  # file paths (str), EncodedImage or ParquetImage
    fields: dict[str, Any] = field(default_factory=dict)  # answers + task fields, for the scorer
