"""JSONL conversations (LLaVA or OpenAI records, ``nvlm.data.formats``) read line by line through a byte-offset index.

The index holds the byte offset of every non-blank line (uint64, 8 bytes a record, memory-mapped) and, only
when the file has blank lines, each record's line number (so errors still say ``file:line``). It is built in
one pass over the file in 16 MiB chunks with numpy, without parsing any JSON: a malformed line is found when
it is read, and is then one bad sample among the others (named by file and line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from nvlm.data.formats import Conversation, DataFormatError, parse_record
from nvlm.data.sources.base import BadRecord, RecordSource, cached_arrays, require_file

CHUNK = 16 << 20


def line_index(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{"offsets": start of each non-blank line} and, when some lines are blank, {"lines": their 1-based numbers}."""
    starts: list[np.ndarray] = []
    with open(path, "rb") as f:
        base, at_line_start = 0, True
        while chunk := f.read(CHUNK):
            newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
            begin = (newlines + 1 + base).astype(np.uint64)
            if at_line_start:
                begin = np.concatenate([np.array([base], np.uint64), begin])
            at_line_start = chunk.endswith(b"\n")
            if at_line_start:
                begin = begin[:-1]  # the newline closing the chunk starts no line inside it
            starts.append(begin)
            base += len(chunk)
    offsets = np.concatenate(starts) if starts else np.zeros(0, np.uint64)
    ends = np.append(offsets[1:], np.uint64(base))
    keep = np.ones(len(offsets), bool)
    with open(path, "rb") as f:
        for j in np.flatnonzero(ends - offsets < 64):  # short lines may be blank: checked one by one
            f.seek(int(offsets[j]))
            keep[j] = bool(f.read(int(ends[j] - offsets[j])).strip())
    out = {"offsets": offsets[keep]}
    if not keep.all():
        out["lines"] = (np.flatnonzero(keep) + 1).astype(np.uint64)
    return out


class JsonlSource(RecordSource):
    """Records of one .jsonl file; images relative to `image_root` (default: the file's folder)."""

    kind = "jsonl"

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> None:
        require_file(path)
        self.path = str(path)
        self.image_root = str(image_root) if image_root is not None else str(Path(path).parent)
        self._reset()
        len(self)  # build or open the index now: its errors belong to start-up

    def _reset(self) -> None:
        super()._reset()
        self._arrays: dict[str, np.ndarray] | None = None
        self._file: Any = None

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = cached_arrays("jsonl", [self.path], lambda: line_index(self.path))
        return self._arrays

    def __len__(self) -> int:
        return len(self.arrays["offsets"])

    def line(self, i: int) -> int:
        lines = self.arrays.get("lines")
        return int(lines[i]) if lines is not None else i + 1

    def read(self, i: int) -> Conversation:
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for the source's life
        where = f"{self.path}:{self.line(i)}"
        self._file.seek(int(self.arrays["offsets"][i]))
        raw = self._file.readline()
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRecord(f"{where}: not valid JSON ({getattr(e, 'msg', e)}); fix or remove that line") from None
        except RecursionError:
            raise BadRecord(f"{where}: JSON nested too deeply; flatten that record") from None
        try:
            return parse_record(obj, self.image_root, where)
        except DataFormatError as e:
            raise BadRecord(str(e)) from None
