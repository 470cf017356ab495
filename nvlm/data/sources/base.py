"""Record sources: a length and record i read on demand, from an on-disk index built once and reused.

A `RecordSource` never holds its records. It knows ``len(source)`` and reads ``source[i]`` (a `Conversation`)
by seeking to where an index says record i is: byte offsets of JSONL lines, byte ranges of WebDataset samples
inside their tar shards, row groups of Parquet files. Indexes are numpy arrays saved as ``.npy`` files and
memory-mapped, so a process's memory does not grow with the data set, and are keyed by each file's path, size
and modification time: built by the first run that needs them (or ``nvlm data index``), reused by every later
one, rebuilt when a file changes. They live in ``$NVLM_INDEX_DIR``, else ``~/.cache/nvlm/index``; writes are
atomic (a temporary file renamed), so processes that build the same index at once do not corrupt it.

A record that cannot be read raises `BadRecord` naming the file and record (counted as a bad sample by the
sample stream); a source that cannot be opened at all (missing file, unknown layout) raises `UserError`
before training starts. Sources pickle as their paths: a data worker process reopens the index itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from nvlm.data.formats import BadRecord, Conversation
from nvlm.errors import UserError

__all__ = ["BadRecord", "ListSource", "RecordSource", "cached_arrays", "file_signature", "require_file"]


class RecordSource(ABC):
    """A sequence of conversations read on demand; subclasses implement ``__len__``, ``read`` and ``describe``.

    Attributes whose names start with ``_`` belong to one process (open files, the mapped index, caches): they
    are not pickled, and ``_reset`` makes them anew. Reads take a lock: a read that timed out in its thread
    (``data.read_timeout_s``) may still be running when the next one starts, and both would seek one file."""

    kind = "records"
    path = ""

    def _reset(self) -> None:
        self._lock = threading.Lock()

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, i: int) -> Conversation: ...

    def __getitem__(self, i: int) -> Conversation:
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {len(self)} in {self.path}")
        with self._lock:
            return self.read(i)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __iter__(self) -> Iterator[Conversation]:
        for i in range(len(self)):
            yield self.read(i)

    def describe(self) -> dict[str, Any]:
        """Layout facts for ``nvlm data inspect``: kind, files, records."""
        return {"kind": self.kind, "path": self.path, "records": len(self)}


class ListSource(RecordSource):
    """Conversations already in memory (small data, tests, programmatic use)."""

    kind = "list"

    def __init__(self, records: Sequence[Conversation], path: str = "<memory>") -> None:
        self.records, self.path = list(records), path
        self._reset()

    def __len__(self) -> int:
        return len(self.records)

    def read(self, i: int) -> Conversation:
        return self.records[i]


def index_dir() -> Path:
    return Path(os.environ.get("NVLM_INDEX_DIR") or Path.home() / ".cache" / "nvlm" / "index")


def file_signature(paths: Sequence[str | os.PathLike]) -> str:
    """A short hash of each file's absolute path, size and mtime: changes when any of them changes."""
    digest = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        digest.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def cached_arrays(
    kind: str, paths: Sequence[str | os.PathLike], build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """The arrays `build()` makes for `paths`, memory-mapped from the index cache (built and saved on a miss)."""
    folder = index_dir() / f"{kind}-{file_signature(paths)}"
    done = folder / "done.json"
    if not done.exists():
        arrays = build()
        names = {"arrays": sorted(arrays), "files": [str(p) for p in paths][:5], "count": len(paths)}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for name, array in arrays.items():
                _atomic(folder / f"{name}.npy", partial(np.save, arr=array, allow_pickle=False))
            _atomic(done, lambda f: f.write(json.dumps(names).encode()))
        except OSError as e:
            raise UserError(
                f"cannot save the data index of {paths[0]} in {folder} ({e.strerror or e}); set NVLM_INDEX_DIR "
                "to a writable folder"
            ) from None
    names = json.loads(done.read_text())["arrays"]
    return {n: np.load(folder / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in names}


def _atomic(path: Path, write: Callable[[Any], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def require_file(path: str | os.PathLike, what: str = "data file") -> None:
    """UserError unless `path` is a regular file (named, with the fix)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found; check data.sources[].path") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: not a regular file (a folder, device or FIFO); give a {what}")
