"""Opening a ``data.sources`` entry: its kind is told from the path, its records read through an index.

``open_sources(path, …)`` → blend `Source`s (one, or one per entry of an InternVL meta-JSON);
``open_mixture(specs, seed)`` → the `Mixture` the trainer reads. Kinds (see each module):
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from nvlm.data.blend import Source
from nvlm.data.formats import read_records
from nvlm.data.mixture import Mixture
from nvlm.data.sources.base import BadRecord, ListSource, RecordSource, file_signature
from nvlm.data.sources.internvl import is_meta, read_meta
from nvlm.data.sources.jsonl import JsonlSource
from nvlm.data.sources.metadataset import BLEND_PREFIX, is_metadataset, leaves
from nvlm.data.sources.parquet import ParquetSource, parquet_files
from nvlm.data.sources.webdataset import WebDatasetSource, energon_shards, shard_paths
from nvlm.errors import UserError

KINDS = (
    "JSONL conversations (a .jsonl file; a .json list is read whole)",
    "Parquet (a .parquet file, a folder of them or a glob: LLaVA-OneVision, The Cauldron, FineVision layouts)",
    "WebDataset tar shards (a .tar, a folder of .tar files, or a brace pattern 'shards/{00000..00099}.tar')",
    "an InternVL meta-JSON (a .json of {name: {root, annotation, repeat_time, ...}})",
    "an Energon dataset folder (.nv-meta from `energon prepare`: its train split's shards, as WebDataset)",
    "an Energon Metadataset blend (a .yaml: MetadatasetV2 splits.train.blend, nested; or blend:NAME, shipped)",
)
__doc__ = (__doc__ or "") + "".join(f"\n* {k}" for k in KINDS) + "\n"
__all__ = ["BadRecord", "KINDS", "RecordSource", "kind_of", "open_mixture", "open_sources", "source_files"]

META_SNIFF_BYTES = 1 << 20  # a meta-JSON is small; a larger .json is a list of records


def kind_of(path: str) -> str:
    """One of "jsonl", "json", "internvl", "parquet", "webdataset", "energon", "metadataset"; else UserError
    listing them."""
    if is_metadataset(path):
        return "metadataset"
    if "{" in path or path.endswith(".tar"):
        return "webdataset"
    if os.path.isdir(path) and (Path(path) / ".nv-meta").is_dir():
        return "energon"
    if path.endswith(".parquet") or (os.path.isdir(path) and parquet_files(path)):
        return "parquet"
    if os.path.isdir(path) and any(Path(path).glob("*.tar")):
        return "webdataset"
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".json"):
        return "internvl" if _looks_like_meta(path) else "json"
    if not os.path.exists(path) and not any(c in path for c in "*?["):
        raise UserError(f"{path}: data source not found; check data.sources[].path")
    raise UserError(f"{path}: cannot tell what kind of data this is; nvlm reads: " + "; ".join(KINDS))


def _looks_like_meta(path: str) -> bool:
    try:
        if os.path.getsize(path) > META_SNIFF_BYTES:
            return False
        return is_meta(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False  # read_records reports it, naming the file


def default_name(path: str) -> str:
    """A source's name when none is given: the file's stem, or the folder before any pattern ('shards/{0..9}.tar',
    'llava-ov/*.parquet' → 'shards', 'llava-ov')."""
    if path.startswith(BLEND_PREFIX):
        return path[len(BLEND_PREFIX) :]
    head = re.split(r"[{*?\[]", path, maxsplit=1)[0]
    if head != path:
        head = head.rsplit("/", 1)[0] if not head.endswith("/") else head
    return Path(head.rstrip("/")).stem or "source"


def open_sources(
    path: str,
    name: str | None = None,
    weight: float = 1.0,
    image_root: str | None = None,
    max_tiles: int | None = None,
    split: str = "train",
) -> list[Source]:
    """The blend sources of one ``data.sources`` entry (`split`: an Energon dataset folder's split part)."""
    if max_tiles is not None and not (isinstance(max_tiles, int) and 1 <= max_tiles <= 40):
        raise UserError(f"{path}: max_tiles must be an integer from 1 to 40, got {max_tiles!r}")
    kind = kind_of(path)
    name = name or default_name(path)
    records: Any
    if kind == "metadataset":
        return open_blend(path, name, weight, max_tiles)
    if kind == "internvl":
        caps = lambda cap: cap if max_tiles is None else min(cap or max_tiles, max_tiles)  # noqa: E731
        return [Source(f"{name}/{e}", recs, weight * share, caps(cap)) for e, recs, share, cap in read_meta(path)]
    if kind == "jsonl":
        records = JsonlSource(path, image_root)
    elif kind == "json":
        records = ListSource(list(read_records(path, image_root)), path)
    elif kind == "parquet":
        files = parquet_files(path)
        if not files:
            raise UserError(f"{path}: no .parquet files there; check data.sources[].path")
        records = ParquetSource(files, path)
    elif kind == "energon":
        records = WebDatasetSource(path, energon_shards(path, split))
    else:
        records = WebDatasetSource(path)
    return [Source(name, records, weight, max_tiles)]


def open_blend(path: str, name: str, weight: float, max_tiles: int | None) -> list[Source]:
    """The sources of an Energon Metadataset blend (``nvlm.data.sources.metadataset``), weighted as Energon
    weighs them, the whole blend keeping the `weight` of its ``data.sources`` entry."""
    found = leaves(path)
    missing = [leaf.path for leaf in found if not _exists(leaf.path)]
    if missing:
        raise UserError(
            f"{path}: {len(missing)} of its {len(found)} datasets not found, e.g. {', '.join(missing[:3])}; "
            "download them (see the blend file's comments) or remove their entries"
        )
    parts: list[tuple[float, list[Source]]] = []
    for leaf in found:
        opened = open_sources(leaf.path, f"{name}/{leaf.name}", 1.0, None, max_tiles, leaf.split)
        size = sum(len(s.records) for s in opened) if leaf.epochized else 1.0  # repetitions × records
        parts.append((leaf.share * size, opened))
    total = sum(share for share, _ in parts) or 1.0
    return [
        Source(s.name, s.records, weight * share / total * s.weight, s.max_tiles)
        for share, opened in parts
        for s in opened
    ]


def _exists(path: str) -> bool:
    return os.path.exists(path) or any(c in path for c in "*?[{")  # patterns: their kind reports missing files


PREFLIGHT = 8  # records read from each source at start: if none reads, its format is wrong


def open_mixture(specs: list[Any], seed: int = 0) -> Mixture:
    """A `Mixture` of ``data.sources`` entries (objects with path, weight, name, image_root[, max_tiles]).
    A source whose first records all fail to read is a UserError now, not a run of bad samples later."""
    sources: list[Source] = []
    for spec in specs:
        sources += open_sources(spec.path, spec.name, spec.weight, spec.image_root, getattr(spec, "max_tiles", None))
    for source in sources:
        preflight(source)
    try:
        return Mixture(sources, seed=seed)
    except ValueError as e:
        raise UserError(f"data.sources: {e}") from None


def preflight(source: Source) -> None:
    """UserError if none of the source's first `PREFLIGHT` records reads (bad records among good ones are
    skipped and counted by the sample stream instead)."""
    errors = []
    for i in range(min(PREFLIGHT, len(source.records))):
        try:
            source.records[i]
            return
        except BadRecord as e:
            errors.append(str(e))
    if errors:  # (an empty source is refused by the Mixture)
        path = getattr(source.records, "path", source.name)
        hint = f"none of the first {len(errors)} records reads: check the format with `nvlm data inspect {path}`"
        raise UserError(f"{errors[0]} ({hint})")


def source_files(path: str) -> list[str]:
    """The files a source reads its records from (for fingerprints and messages; not the images they name)."""
    kind = kind_of(path)
    if kind == "parquet":
        return parquet_files(path)
    if kind == "webdataset":
        return shard_paths(path)
    if kind == "energon":
        return energon_shards(path)
    if kind == "internvl":
        return [path] + [str(Path(r.path)) for _, r, _, _ in read_meta(path)]
    if kind == "metadataset":
        from nvlm.data.sources.metadataset import resolve

        return [str(resolve(path)[0])] + [f for leaf in leaves(path) for f in source_files(leaf.path)]
    return [path]


def signature(path: str) -> str:
    """A fingerprint of a source's files (path, size, mtime): cheap at any size, unlike a content hash."""
    return file_signature(source_files(path))
