"""WebDataset tar shards: one sample = the consecutive members sharing a key (``0001.jpg``, ``0001.json``).

Shards are named by a brace pattern (``shards/{00000..00099}.tar``, ``{a,b}``), a glob, a folder of ``.tar``
files, one ``.tar``, or an Energon dataset folder (prepared by ``energon prepare``: the shards of its ``train``
split part, from ``.nv-meta/split.yaml``; Energon's own index and sample-level excludes are not used). Each
shard is scanned once with the standard library's ``tarfile`` (headers only, the member data is skipped) for
the byte range of every sample; the ranges (two uint64 a sample) are cached like every index, so reading
sample i is one seek and one read of that range, parsed with ``tarfile`` in memory.

A sample maps to a conversation by its members:

* an image (``jpg``, ``jpeg``, ``png``, ``webp``, ``gif``, ``bmp``; several: ``0.jpg``, ``1.jpg`` … in order)
  and a ``json`` record in the LLaVA or OpenAI form (``nvlm.data.formats``): the sample's images take the
  places of the record's ``<image>`` placeholders (its own image paths are ignored);
* an image and a ``json`` with ``question`` and ``answer`` (or ``answers``): a VQA turn (Energon's
  ``VQASample`` fields);
* an image and a caption (``txt`` or ``caption``): a captioning turn with one of the paper's caption prompts
  (``nvlm.data.templates``), chosen by the sample's key.

A shard that ends inside a sample (a truncated download), a sample whose image is missing and a ``json`` that
does not parse are bad records naming the shard and the key; a shard named but absent is an error at start.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import re
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from nvlm.data import templates
from nvlm.data.formats import Conversation, DataFormatError, parse_record
from nvlm.data.sources.base import BadRecord, RecordSource, cached_arrays
from nvlm.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
_BRACE = re.compile(r"\{([^{}]*)\}")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's rule: key = path up to the basename's first dot


def expand_braces(pattern: str) -> list[str]:
    """``a{0..2}b`` → a0b a1b a2b (zero-padded like the bounds), ``{x,y}`` → x y; groups combine left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        items = [str(v).zfill(width) for v in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [e for item in items for e in expand_braces(head + item + tail)]


def shard_paths(spec: str) -> list[str]:
    """The shards a spec names, in order; UserError naming the missing ones."""
    if "{" in spec:
        shards = expand_braces(spec)
    elif any(ch in spec for ch in "*?["):
        shards = sorted(glob.glob(spec))
    elif os.path.isdir(spec):
        shards = sorted(str(p) for p in Path(spec).glob("*.tar"))
    else:
        shards = [spec]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing or not shards:
        raise UserError(
            f"{spec}: {len(missing)} of {len(shards)} shard(s) missing (e.g. {missing[:3]}); "
            "check the path and brace pattern, or download the missing shards"
        )
    return shards


def energon_shards(folder: str, split: str = "train") -> list[str]:
    """The shards of an Energon dataset's split (``.nv-meta/split.yaml``: ``split_parts``, minus ``exclude``)."""
    import yaml

    meta = Path(folder) / ".nv-meta"
    found = [meta / n for n in ("split.yaml", "split.json") if (meta / n).is_file()]
    if not found:
        raise UserError(f"{folder}: an Energon dataset without .nv-meta/split.yaml; run `energon prepare {folder}`")
    splits = yaml.safe_load(found[0].read_text()) or {}
    parts = (splits.get("split_parts") or {}).get(split)
    if not parts:
        raise UserError(f"{found[0]}: no {split!r} split part (has {sorted(splits.get('split_parts') or {})})")
    exclude = {e for x in splits.get("exclude") or [] for e in expand_braces(x)}
    return [str(Path(folder) / n) for part in parts for n in expand_braces(part) if n not in exclude]


def scan_shard(path: str) -> np.ndarray:
    """[samples, 2] uint64 byte ranges (first header, end of last member's data) of one shard's samples.
    A shard that ends early keeps its whole samples; the sample cut short reaches past the end (read: bad)."""
    spans: list[tuple[int, int]] = []
    key, start, end = None, 0, 0
    size = os.path.getsize(path)
    with tarfile.open(path, "r:") as tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.ReadError, EOFError):  # the shard ends early: the cut sample reaches past the end
                if key is not None and end <= size:  # cut inside the next sample's first header
                    spans.append((start, end))
                    start = -(-end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                key, end = key or "", size + 1
                break
            if info is None:
                break
            m = _KEY.match(info.name)
            if not info.isfile() or m is None:
                continue
            if m.group(1) != key:
                if key is not None:
                    spans.append((start, end))
                key, start = m.group(1), info.offset
            end = info.offset_data + info.size
    if key is not None:
        spans.append((start, end))
    return np.array(spans, np.uint64).reshape(-1, 2)


def _scan(shards: list[str]) -> dict[str, np.ndarray]:
    spans = []
    for shard in shards:
        try:
            spans.append(scan_shard(shard))
        except (tarfile.TarError, OSError) as e:  # not a tar at all (an empty or HTML "download")
            raise UserError(f"{shard}: not a readable tar shard ({e}); re-download or remove it") from None
    counts = np.array([len(s) for s in spans], np.int64)
    return {"spans": np.concatenate(spans), "starts": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)}


class WebDatasetSource(RecordSource):
    """Samples of WebDataset shards, read by byte range."""

    kind = "webdataset"

    def __init__(self, spec: str, shards: list[str] | None = None) -> None:
        self.path, self.shards = spec, shards or shard_paths(spec)
        missing = [s for s in self.shards if not os.path.isfile(s)]
        if missing:
            raise UserError(f"{spec}: {len(missing)} shard(s) missing (e.g. {missing[:3]}); download them")
        self._reset()
        len(self)

    def _reset(self) -> None:
        super()._reset()
        self._arrays: dict[str, np.ndarray] | None = None
        self._open: OrderedDict[int, Any] = OrderedDict()  # a few open shard files, least recent first

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = cached_arrays("wds", self.shards, lambda: _scan(self.shards))
        return self._arrays

    def __len__(self) -> int:
        return int(self.arrays["starts"][-1])

    def _file(self, shard: int) -> Any:
        if shard not in self._open:
            if len(self._open) >= 8:
                self._open.popitem(last=False)[1].close()
            self._open[shard] = open(self.shards[shard], "rb")  # noqa: SIM115 - closed when evicted
        self._open.move_to_end(shard)
        return self._open[shard]

    def members(self, i: int) -> tuple[str, str, dict[str, bytes]]:
        """(shard, key, {extension: bytes}) of sample i."""
        shard = int(np.searchsorted(self.arrays["starts"], i, side="right")) - 1
        a, b = (int(v) for v in self.arrays["spans"][i])
        f = self._file(shard)
        f.seek(a)
        raw = f.read(b - a)
        name, key = self.shards[shard], _first_key(raw) or f"#{i - int(self.arrays['starts'][shard])}"
        if len(raw) < b - a:
            raise BadRecord(f"{name}: sample {key}: truncated (the shard ends inside it); re-download the shard")
        files = plain_members(raw)
        if files is None:  # extended headers (long names, pax), or a header that fails its checksum
            files = tarfile_members(raw, f"{name}: sample {key}")
        out = {}
        for member, data in files:
            m = _KEY.match(member)
            if m is not None:
                key, out[m.group(2)] = m.group(1), data
        return name, key, out

    def read(self, i: int) -> Conversation:
        name, key, members = self.members(i)
        where = f"{name}: sample {key}"
        try:
            return sample_to_conversation(key, members, where)
        except DataFormatError as e:
            raise BadRecord(str(e)) from None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "shards": len(self.shards)}


def plain_members(raw: bytes) -> list[tuple[str, bytes]] | None:
    """(name, data) of the regular files in `raw`, read straight from ustar headers (five times faster than
    ``tarfile`` on a sample); None when a header is not a plain file header with a valid checksum."""
    out, pos = [], 0
    while pos + tarfile.BLOCKSIZE <= len(raw):
        head = raw[pos : pos + tarfile.BLOCKSIZE]
        if not any(head):
            break
        try:
            checksum = int(head[148:156].split(b"\0", 1)[0].strip(), 8)
            size = int(head[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:  # no octal number there (a base-256 size, or garbage)
            return None
        if head[156:157] not in (b"0", b"\0") or sum(head) - sum(head[148:156]) + 256 != checksum:
            return None
        name = head[:100].split(b"\0", 1)[0]
        if head[257:262] == b"ustar" and head[345]:
            name = head[345:500].split(b"\0", 1)[0] + b"/" + name
        pos += tarfile.BLOCKSIZE
        out.append((name.decode("utf-8", "surrogateescape"), raw[pos : pos + size]))
        pos += -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return out


def tarfile_members(raw: bytes, where: str) -> list[tuple[str, bytes]]:
    """(name, data) of the regular files in `raw`, through ``tarfile`` (every header kind); BadRecord if broken."""
    whole = raw + bytes(-len(raw) % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE)  # padding + end-of-archive
    out = []
    try:
        with tarfile.open(fileobj=io.BytesIO(whole), mode="r:") as tar:
            for info in tar:
                data = tar.extractfile(info) if info.isfile() else None
                if data is not None:
                    out.append((info.name, data.read()))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BadRecord(f"{where}: unreadable ({e})") from None
    return out


def _first_key(raw: bytes) -> str | None:
    """The key in the sample's first tar header, if that header is whole and plain (else None)."""
    try:
        m = _KEY.match(tarfile.TarInfo.frombuf(raw[: tarfile.BLOCKSIZE], "utf-8", "surrogateescape").name)
    except (tarfile.HeaderError, ValueError):
        return None
    return m.group(1) if m else None


def _image_members(members: dict[str, bytes]) -> list[bytes]:
    exts = sorted(e for e in members if e.lower().rsplit(".", 1)[-1] in IMAGE_EXTS)
    return [members[e] for e in exts]


def sample_to_conversation(key: str, members: dict[str, bytes], where: str) -> Conversation:
    images = _image_members(members)
    if "json" in members:
        try:
            obj = json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise DataFormatError(f"{where}: its .json does not parse ({str(e)[:120]})") from None
        if isinstance(obj, dict) and ("conversations" in obj or "messages" in obj):
            wanted = obj.get("image", obj.get("images"))
            if wanted and not images:
                raise DataFormatError(f"{where}: the record names an image but the sample has none ({sorted(members)})")
            conv = parse_record(obj, ".", where, images=images)
            return conv
        if isinstance(obj, dict) and "question" in obj and ("answer" in obj or obj.get("answers")):
            answer = obj.get("answer") or obj["answers"][0]
            return _one_image(templates.vqa, images, where, members, str(obj["question"]), str(answer))
    text = members.get("txt", members.get("caption"))
    if text is not None:
        rng = random.Random(key)
        return _one_image(templates.caption, images, where, members, text.decode("utf-8", "replace").strip(), rng=rng)
    raise DataFormatError(
        f"{where}: no conversation: members {sorted(members)}; nvlm reads an image with a .json conversation "
        "(LLaVA/OpenAI, or question/answer) or a .txt caption"
    )


def _one_image(build: Any, images: list[bytes], where: str, members: dict[str, bytes], *args: Any, **kw: Any) -> Any:
    if len(images) != 1:
        raise DataFormatError(f"{where}: expected one image member, found {len(images)} ({sorted(members)})")
    conv = build(images[0], *args, **kw)
    conv.source = where
    return conv
