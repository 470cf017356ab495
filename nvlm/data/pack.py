"""``nvlm data pack``: any source → WebDataset tar shards, the layout that reads fastest at random.

Each record becomes one sample keyed by its number: its images as ``{key}.{nn}.{png|jpg|webp|gif|bmp}`` (the
bytes as stored; files named by path are copied in) and its conversation as ``{key}.json`` in the LLaVA form,
``<image>`` placeholders kept, so ``nvlm.data.sources.webdataset`` reads back the same conversation. Shards
close at ``shard_size`` bytes. A Parquet release, whose row groups must be decoded whole to reach one row, or
a JSONL file beside millions of loose images, is read by a run with one seek a sample once packed. Records
that cannot be read are skipped and counted (named in the summary); images are checked to be one of the
formats the safe loader accepts, never decoded.

The folder is also an Energon dataset (``.nv-meta/``: ``split.yaml`` with every shard in the ``train`` part,
``dataset.yaml`` declaring Energon's ``CrudeWebdataset``, whose samples a task encoder cooks from the raw
members). With ``megatron-energon`` installed (``pip install 'nvlm[energon]'``) Energon's own preparer indexes
the shards (``.info.json``, ``*.tar.idx``, ``index.sqlite``), so ``megatron.energon.get_train_dataset`` opens
the folder as it is; without it the shard counts are written and ``energon prepare --tar-index-only`` adds
the index later. nvlm reads the folder either way (``nvlm.data.sources``: an Energon dataset folder).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvlm.data.formats import BadRecord, Conversation, to_llava
from nvlm.errors import UserError

MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF8", "gif"), (b"BM", "bmp"))


DATASET_YAML = """\
# nvlm data pack: sample KEY = KEY.NN.<png|jpg|webp|gif|bmp> (its images, in <image> order) + KEY.json (the
# conversation in the LLaVA form: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}).
__module__: megatron.energon
__class__: CrudeWebdataset
"""


@dataclass
class Packed:
    shards: list[str] = field(default_factory=list)
    samples: int = 0
    skipped: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # samples per shard
    energon_index: str = ""  # the megatron-energon version that indexed the shards ("": not indexed)

    @property
    def pattern(self) -> str:
        """The brace pattern naming the shards written (a data.sources path)."""
        folder = str(Path(self.shards[0]).parent) if self.shards else "."
        return f"{folder}/{{00000..{len(self.shards) - 1:05d}}}.tar"


def image_bytes(image: Any, where: str) -> tuple[bytes, str]:
    """(bytes, extension) of an image given as bytes, a path or a PIL image; BadRecord if of no known format."""
    if isinstance(image, str | Path):
        try:
            data = Path(image).read_bytes()
        except OSError as e:
            raise BadRecord(f"{where}: image {image} unreadable ({e.strerror or e})") from None
    elif isinstance(image, bytes | bytearray):
        data = bytes(image)
    else:  # a PIL image (the templates' builders accept those)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return data, "webp"
    for magic, ext in MAGIC:
        if data.startswith(magic):
            return data, ext
    raise BadRecord(f"{where}: an image is none of PNG, JPEG, WEBP, GIF, BMP")


def sample_members(key: str, conv: Conversation) -> list[tuple[str, bytes]]:
    members = [
        (f"{key}.{n:02d}.{ext}", data)
        for n, (data, ext) in enumerate(image_bytes(im, conv.source) for im in conv.images)
    ]
    record = to_llava(Conversation(conv.messages, []))
    return members + [(f"{key}.json", json.dumps(record, ensure_ascii=False).encode())]


def pack(records: Any, out: str | Path, shard_size: int = 1 << 30) -> Packed:
    """Write `records` (a sequence of conversations) as shards ``out/00000.tar``, … of about `shard_size` bytes."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: not empty; pack into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    result = Packed()
    tar, written = None, 0
    try:
        for i in range(len(records)):
            try:
                members = sample_members(f"{i:09d}", records[i])
            except BadRecord as e:
                result.skipped.append(str(e))
                continue
            if tar is None or written >= shard_size:
                if tar is not None:
                    tar.close()
                result.shards.append(str(out / f"{len(result.shards):05d}.tar"))
                result.counts.append(0)
                tar, written = tarfile.open(result.shards[-1], "w", format=tarfile.USTAR_FORMAT), 0
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
                written += 512 + -(-len(data) // 512) * 512
            result.samples += 1
            result.counts[-1] += 1
    finally:
        if tar is not None:
            tar.close()
    if result.shards:
        result.energon_index = write_energon_meta(out, result)
    return result


def write_energon_meta(out: Path, packed: Packed) -> str:
    """``out/.nv-meta``: Energon's dataset description of the shards; indexed by Energon itself when installed.
    Returns the megatron-energon version that indexed them, or "" when it is not installed."""
    meta = out / ".nv-meta"
    meta.mkdir()
    (meta / "dataset.yaml").write_text(DATASET_YAML)
    names = [Path(s).name for s in packed.shards]
    try:
        from megatron.energon import BaseWebdatasetFactory
    except ImportError:
        info = {"shard_counts": dict(zip(names, packed.counts))}
        (meta / ".info.json").write_text(json.dumps(info, indent=2))
        split = {"split_parts": {"train": names, "val": [], "test": []}, "exclude": []}
        (meta / "split.yaml").write_text(json.dumps(split, indent=2))  # JSON is YAML
        return ""
    import contextlib
    from importlib.metadata import version

    ratio = [("train", 1.0), ("val", 0.0), ("test", 0.0)]  # every shard in the train part, in order
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines; its errors still raise
        BaseWebdatasetFactory.prepare_dataset(out, names, split_parts_ratio=ratio, shuffle_seed=None, workers=1)
    return version("megatron-energon")


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64KiB', '1000' → bytes; UserError otherwise."""
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    number = text.strip().upper().rstrip("BIKMG")
    unit = text.strip().upper()[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise UserError(f"--shard-size {text!r}: give a size such as 1GB, 500MB or 64MiB") from None
    if value < 1:
        raise UserError(f"--shard-size {text!r}: must be positive")
    return int(value)
