"""Reading and writing safetensors one tensor at a time, so converting a 150 GB checkpoint never holds it.

A safetensors file is an 8-byte little-endian header length, a JSON header (name → dtype, shape and byte
offsets into the data that follows) and the raw tensor bytes. Reading a tensor is then a seek and a read of
exactly its bytes (no mmap of the whole shard), and writing a file needs only the header up front: the
shapes and dtypes of the outputs are known from the inputs' headers before any data is read, so tensors are
produced and written one by one. Bytes are copied as they are: a conversion that only renames and slices
is bit-exact.

Sharded folders follow Hugging Face's convention: ``model-0000k-of-0000N.safetensors`` and a
``model.safetensors.index.json`` mapping every name to its shard (``metadata.total_size`` = data bytes).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: read with `.read()`, nothing is loaded before."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def read(self) -> torch.Tensor:
        buf = bytearray(self.nbytes)
        with open(self.file, "rb") as f:
            f.seek(self.start)
            if f.readinto(buf) != self.nbytes:
                raise ValueError(f"{self.file}: truncated data for {self.name}")
        if not buf:
            return torch.empty(self.shape, dtype=DTYPES[self.dtype])
        return torch.frombuffer(buf, dtype=DTYPES[self.dtype]).reshape(self.shape)


def read_header(file: str | Path) -> dict[str, TensorRef]:
    """name → TensorRef of every tensor in one safetensors file (reads only the header)."""
    file = Path(file)
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    base = 8 + n
    return {
        name: TensorRef(
            file,
            name,
            h["dtype"],
            tuple(h["shape"]),
            base + h["data_offsets"][0],
            base + h["data_offsets"][1],
        )
        for name, h in header.items()
    }


def folder_tensors(folder: str | os.PathLike) -> dict[str, TensorRef]:
    """Every tensor of a Hugging Face weights folder: through its index if it has one, else every *.safetensors."""
    folder = Path(folder)
    index = folder / INDEX
    files = (
        sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.is_file()
        else sorted(folder.glob("*.safetensors"))
    )
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (pickle .bin checkpoints are not read)")
    refs: dict[str, TensorRef] = {}
    for file in files:
        refs.update(read_header(file))
    return refs


@dataclass
class OutTensor:
    """A tensor to write: its name, dtype and shape (known before any data is read) and how to make it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def write_file(path: str | Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file, producing and writing each tensor in turn (one in memory at a time)."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            value = t.make()
            if tuple(value.shape) != t.shape or value.dtype != DTYPES[t.dtype]:
                raise ValueError(f"{t.name}: made {tuple(value.shape)} {value.dtype}, planned {t.shape} {t.dtype}")
            f.write(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            del value


def write_sharded(
    folder: str | Path,
    tensors: Iterable[OutTensor],
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
    always_index: bool = False,
) -> list[Path]:
    """Write `tensors` (in order) into shards of at most `max_shard_bytes` (a bigger tensor gets its own) with
    an index; a single shard is ``model.safetensors`` without an index unless `always_index`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    names = (
        ["model.safetensors"]
        if n == 1 and not always_index
        else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    )
    for name, group in zip(names, groups):
        write_file(folder / name, group, metadata)
    if len(names) > 1 or always_index:
        weight_map = {t.name: name for name, group in zip(names, groups) for t in group}
        total = sum(t.nbytes for group in groups for t in group)
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [folder / name for name in names]
