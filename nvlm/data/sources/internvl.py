"""InternVL's meta-JSON: a blend in one file, ``{name: {root, annotation, repeat_time, length, max_dynamic_patch}}``.

Each entry is a LLaVA-format JSONL annotation file with image paths relative to ``root``. InternVL
concatenates its entries, each repeated ``repeat_time`` times (a fraction subsamples), so an entry's share of
the meta-JSON is proportional to records × ``repeat_time``: that is the weight it gets here (the whole file
keeping the weight given to it in ``data.sources``). ``max_dynamic_patch`` caps that entry's tiles per image
below the model's ``tiling.max_tiles``. Relative paths are relative to the meta-JSON's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nvlm.data.sources.base import ListSource, RecordSource
from nvlm.data.sources.jsonl import JsonlSource
from nvlm.errors import UserError


def is_meta(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, dict) and "annotation" in v for v in obj.values())


def read_meta(path: str) -> list[tuple[str, RecordSource, float, int | None]]:
    """[(entry name, its records, its share of the file's weight, its tile cap)] of an InternVL meta-JSON."""
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the InternVL meta-JSON ({e})") from None
    if not is_meta(meta):
        raise UserError(f"{path}: not an InternVL meta-JSON: expected {{name: {{root, annotation, ...}}}}")
    here = Path(path).parent
    entries = []
    for name, entry in meta.items():
        annotation, root = here / entry["annotation"], here / entry.get("root", "")
        repeat = float(entry.get("repeat_time", 1.0))
        if repeat <= 0:
            raise UserError(f"{path}: {name}.repeat_time must be > 0, got {repeat}")
        if annotation.suffix == ".json":
            from nvlm.data.formats import read_records

            records: RecordSource = ListSource(list(read_records(annotation, root)), str(annotation))
        else:
            records = JsonlSource(annotation, root)
        cap = entry.get("max_dynamic_patch")
        entries.append((name, records, len(records) * repeat, int(cap) if cap else None))
    total = sum(share for _, _, share, _ in entries) or 1.0
    return [(name, records, share / total, cap) for name, records, share, cap in entries]
