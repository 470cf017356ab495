"""Parquet releases with embedded images: LLaVA-OneVision-Data, The Cauldron and FineVision layouts.

Layouts, told apart by their columns:

* ``llava`` (LLaVA-OneVision-Data): ``id``, ``image`` {bytes, path} (or null: text only), ``conversations``
  [{from, value}] with ``<image>`` where the image goes (in front of the first user turn when absent);
* ``cauldron`` (The Cauldron): ``images`` [{bytes, path}], ``texts`` [{user, assistant, source}]: one user /
  assistant pair per turn, the images in front of the first user turn;
* ``finevision`` (FineVision): the Cauldron's ``images`` and ``texts`` plus ``source`` and per-turn quality
  ratings (``*_ratings`` columns), which ``nvlm data inspect`` shows.
* ``pairs`` (text-only SFT releases): an instruction and its answer per row (``instruction`` / ``output``,
  ``query`` / ``response``, ``question`` / ``answer``, … : ``nvlm.data.formats.PAIRS``).

The index is each file's row groups (row counts from the Parquet footers, cached like every index), so record i
is read by decoding only its row group (the last one decoded is kept, for readers that go in order). A row
group that does not decode is a bad record naming the file and row group; the others are read as usual.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from nvlm.data.formats import Conversation, DataFormatError, pair_fields, parse_record
from nvlm.data.sources.base import BadRecord, RecordSource, cached_arrays, require_file
from nvlm.errors import UserError

LAYOUTS = {
    "llava": ("conversations",),
    "cauldron": ("images", "texts"),
}


def layout_of(columns: list[str], path: str) -> str:
    if all(c in columns for c in LAYOUTS["llava"]):
        return "llava"
    if all(c in columns for c in LAYOUTS["cauldron"]):
        return "finevision" if "source" in columns or any(c.endswith("_ratings") for c in columns) else "cauldron"
    if pair_fields(columns) is not None and not {"image", "images"} & set(columns):
        return "pairs"
    raise UserError(
        f"{path}: Parquet columns {columns} match no layout nvlm reads: LLaVA-OneVision (id, image, conversations), "
        "The Cauldron (images, texts), FineVision (images, texts, source) or text-only instruction / answer pairs"
    )


def _row_groups(files: list[str]) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    starts, file_of, group_of, total = [0], [], [], 0
    for f, path in enumerate(files):
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not Parquet
            raise UserError(f"{path}: not a readable Parquet file ({e}); fix or remove it") from None
        for g in range(meta.num_row_groups):
            total += meta.row_group(g).num_rows
            starts.append(total)
            file_of.append(f)
            group_of.append(g)
    return {
        "starts": np.array(starts, np.int64),
        "file": np.array(file_of, np.int32),
        "group": np.array(group_of, np.int32),
    }


class ParquetSource(RecordSource):
    """Rows of one or more Parquet files in one layout, each row one conversation."""

    kind = "parquet"

    def __init__(self, files: list[str], path: str | None = None) -> None:
        import pyarrow.parquet as pq

        for f in files:
            require_file(f, "Parquet file")
        self.files, self.path = files, path or files[0]
        self.columns = list(pq.read_schema(files[0]).names)
        self.layout = layout_of(self.columns, files[0])
        self._reset()
        len(self)  # build or open the index now

    def _reset(self) -> None:
        super()._reset()
        self._arrays: dict[str, np.ndarray] | None = None
        self._cached: tuple[int, Any] | None = None  # (row group, its Arrow table)
        self._open: dict[str, Any] = {}  # path → pyarrow.parquet.ParquetFile

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = cached_arrays("parquet", self.files, lambda: _row_groups(self.files))
        return self._arrays

    def __len__(self) -> int:
        return int(self.arrays["starts"][-1])

    def _table(self, g: int) -> Any:
        """Row group g (global numbering) as an Arrow table; the last one is kept."""
        import pyarrow.parquet as pq

        if self._cached is None or self._cached[0] != g:
            path = self.files[int(self.arrays["file"][g])]
            group = int(self.arrays["group"][g])
            try:
                if path not in self._open:
                    if len(self._open) >= 4:  # a few footers parsed and kept: files are met again and again
                        self._open.pop(next(iter(self._open)))
                    self._open[path] = pq.ParquetFile(path)
                table = self._open[path].read_row_group(group, columns=self._wanted())
            except Exception as e:  # noqa: BLE001 - a corrupt row group: ArrowInvalid, OSError, ...
                raise BadRecord(f"{path}: row group {group} does not decode ({str(e)[:200]}); skipped") from None
            self._cached = (g, table)
        return self._cached[1]

    def _wanted(self) -> list[str]:
        keep = {"id", "image", "conversations", "images", "texts", "source", "input", "system"}
        keep |= set(pair_fields(self.columns) or ()) if self.layout == "pairs" else set()
        return [c for c in self.columns if c in keep]

    def read(self, i: int) -> Conversation:
        starts = self.arrays["starts"]
        g = int(np.searchsorted(starts, i, side="right")) - 1
        row = self._table(g).slice(i - int(starts[g]), 1).to_pylist()[0]
        path = self.files[int(self.arrays["file"][g])]
        where = f"{path}: row {i - int(starts[g])} of row group {int(self.arrays['group'][g])}"
        if row.get("id") is not None:
            where += f" (id {row['id']})"
        try:
            return row_to_conversation(row, self.layout, where, Path(path).parent)
        except DataFormatError as e:
            raise BadRecord(str(e)) from None

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "layout": self.layout,
            "files": len(self.files),
            "row_groups": len(self.arrays["group"]),
            "columns": self.columns,
        }


def _image(value: Any, root: Path, where: str) -> Any:
    """An HF Image cell ({bytes, path}, or raw bytes) → bytes or a path for the safe loader."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            return str(root / value["path"])
    raise DataFormatError(f"{where}: an image cell holds neither bytes nor a path")


def row_to_conversation(row: dict[str, Any], layout: str, where: str, root: Path) -> Conversation:
    if layout == "pairs":
        return parse_record(row, root, where)
    if layout == "llava":
        cell = row.get("image")
        images = [_image(cell, root, where)] if cell is not None else []
        return parse_record({"conversations": row["conversations"]}, root, where, images=images)
    images = [_image(c, root, where) for c in row.get("images") or []]
    messages: list[dict[str, str]] = []
    for k, turn in enumerate(row.get("texts") or []):
        user, answer = (turn or {}).get("user"), (turn or {}).get("assistant")
        if not isinstance(user, str) or not isinstance(answer, str):
            raise DataFormatError(f"{where}: texts[{k}] needs string 'user' and 'assistant' fields")
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if not messages:
        raise DataFormatError(f"{where}: no texts, so nothing to learn from")
    conv = parse_record({"messages": messages}, root, where, images=images)
    if layout == "finevision" and row.get("source"):
        conv.source = f"{where} [{row['source']}]"
    return conv


def parquet_files(path: str) -> list[str]:
    """The .parquet files of a file, a folder (searched recursively) or a glob, sorted."""
    import glob

    if any(ch in path for ch in "*?["):
        found = sorted(glob.glob(path, recursive=True))
    elif os.path.isdir(path):
        found = sorted(str(p) for p in Path(path).rglob("*.parquet"))
    else:
        found = [path]
    return [f for f in found if f.endswith(".parquet")]
