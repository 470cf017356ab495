"""Energon Metadataset blends: a YAML file naming datasets and their weights (the loader the paper's code used).

A ``data.sources`` path ending in ``.yaml``/``.yml`` is read as Megatron-Energon's ``MetadatasetV2``::

    __module__: megatron.energon
    __class__: MetadatasetV2
    splits:
      train:
        blend:                          # or blend_epochized: [{repetitions: 2, path: …}, …]
          - weight: 5
            path: ./coco                # any source nvlm reads, or another Metadataset YAML (nested)
            subflavors: {augmentation: false}
          - weight: 2
            path: ./ocr-blend.yaml

(the older ``Metadataset`` with a ``datasets: [{weight, path, subflavors}]`` list, as NVLM's Megatron example
writes it, is read too). Only the ``train`` split is used. Weights follow Energon: a nested blend's weights are
shares of its entry's weight. ``blend_epochized`` gives each dataset ``repetitions`` passes per epoch, so its
share of the blend is repetitions × its records (computed once the sources are open). Relative paths are
relative to the YAML file's folder, as in Energon; the blends shipped with nvlm (``blend:nvlm-sft``,
``blend:nvlm-pretrain``, in ``nvlm/recipes/blends``) are relative to the data root, ``$NVLM_DATA_ROOT``.
``subflavors`` are accepted and shown by ``nvlm data inspect`` but change nothing (nvlm has one task
encoder); Energon keys nvlm does not implement (``subset``, ``aux``, ``join``, custom configs) are refused
by name rather than ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvlm.errors import UserError

BLEND_PREFIX = "blend:"
BLENDS = Path(__file__).resolve().parents[2] / "recipes" / "blends"
ROOT_ENV = "NVLM_DATA_ROOT"

ENTRY_KEYS = {"path", "weight", "repetitions", "subflavors", "split_part", "shuffle_over_epochs_multiplier"}
REFUSED_KEYS = {"subset", "aux", "join", "joiner", "dataset_config", "split_config", "nonmatch"}


@dataclass
class Leaf:
    """One dataset of a blend: its path, its share of the blend (or repetitions per epoch), its subflavors."""

    path: str
    name: str
    share: float  # weight mode: the fraction of the blend; epochized: repetitions (× records, later)
    epochized: bool
    split: str = "train"
    subflavors: dict[str, Any] = field(default_factory=dict)


def is_metadataset(path: str) -> bool:
    return path.startswith(BLEND_PREFIX) or path.endswith((".yaml", ".yml"))


def shipped_blends() -> list[str]:
    return sorted(p.stem for p in BLENDS.glob("*.yaml"))


def data_root() -> Path:
    root = os.environ.get(ROOT_ENV)
    if not root:
        raise UserError(
            f"the shipped blends name datasets under a data root: set {ROOT_ENV}=/path/to/data "
            "(or pass --data-root to nvlm data)"
        )
    return Path(root)


def resolve(path: str) -> tuple[Path, Path]:
    """(the YAML file, the folder its relative paths start from) of a blend path or ``blend:NAME``."""
    if path.startswith(BLEND_PREFIX):
        name = path[len(BLEND_PREFIX) :]
        if name not in shipped_blends():
            raise UserError(f"{path}: no such shipped blend; there are: {', '.join(shipped_blends())}")
        return BLENDS / f"{name}.yaml", data_root()
    if not os.path.isfile(path):
        raise UserError(f"{path}: blend file not found; check data.sources[].path")
    return Path(path), Path(path).parent


def _load(path: Path) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read the blend YAML ({str(e)[:200]})") from None
    cls = doc.get("__class__") if isinstance(doc, dict) else None
    if cls not in ("MetadatasetV2", "Metadataset") or doc.get("__module__") != "megatron.energon":
        raise UserError(
            f"{path}: a YAML data source must be an Energon Metadataset (__module__: megatron.energon, "
            "__class__: MetadatasetV2 with splits.train.blend, or Metadataset with datasets)"
        )
    known = {"__module__", "__class__", "splits" if cls == "MetadatasetV2" else "datasets"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown} in a {cls}; it has {sorted(known)}")
    return doc


def leaves(path: str, split: str = "train") -> list[Leaf]:
    """The datasets of a blend file (nested blends flattened), in file order."""
    top, base = resolve(path)
    found = _leaves(top, base, split, 1.0, None, [], str(top))
    for leaf in found:  # named from the top file's folder, so datasets of different nested files stay apart
        inside = not os.path.relpath(leaf.path, base).startswith("..")
        leaf.name = os.path.relpath(leaf.path, base) if inside else leaf.path
    return found


def _leaves(
    file: Path, base: Path, split: str, share: float, epochized: bool | None, seen: list[Path], where: str
) -> list[Leaf]:
    if file.resolve() in seen:
        raise UserError(f"{where}: the blend includes itself ({' → '.join(map(str, [*seen, file]))})")
    seen = [*seen, file.resolve()]
    doc = _load(file)
    if doc["__class__"] == "Metadataset":
        node: Any = {"blend": doc.get("datasets")}
    else:
        node = (doc.get("splits") or {}).get(split)
        if not isinstance(node, dict):
            raise UserError(f"{file}: no splits.{split} (has {sorted(doc.get('splits') or {})})")
    if "path" in node and not ({"blend", "blend_epochized"} & set(node)):  # one dataset: the parent's kind of blend
        node = {"blend_epochized": [node]} if epochized else {"blend": [node]}
    mode = "blend_epochized" if "blend_epochized" in node else "blend"
    entries = node.get(mode)
    unknown = sorted(set(node) - {mode})
    if unknown:
        raise UserError(f"{file}: splits.{split}: nvlm does not read {unknown} beside {mode}")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{file}: splits.{split} must hold a non-empty blend or blend_epochized list of entries")
    is_epochized = mode == "blend_epochized"
    if epochized is not None and epochized != is_epochized:
        raise UserError(f"{file}: a blend_epochized and a weighted blend cannot nest (Energon refuses it too)")
    key = "repetitions" if is_epochized else "weight"
    values = [_entry(file, i, e, key) for i, e in enumerate(entries)]
    total = (sum(v for v, _ in values) or 1.0) if not is_epochized else 1.0
    out: list[Leaf] = []
    for value, entry in values:
        target = Path(entry["path"]) if os.path.isabs(entry["path"]) else base / entry["path"]
        part = share * value / total
        flavors = dict(entry.get("subflavors") or {})
        if str(target).endswith((".yaml", ".yml")):
            inner = _leaves(target, target.parent, entry.get("split_part", split), part, is_epochized, seen, where)
            out += [Leaf(x.path, x.name, x.share, x.epochized, x.split, {**flavors, **x.subflavors}) for x in inner]
        else:
            out.append(Leaf(str(target), target.name, part, is_epochized, entry.get("split_part", split), flavors))
    return out


def _entry(file: Path, i: int, entry: Any, key: str) -> tuple[float, dict[str, Any]]:
    where = f"{file}: blend entry {i}"
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise UserError(f"{where}: needs a path (got {entry!r})")
    refused = sorted(set(entry) & REFUSED_KEYS)
    if refused:
        raise UserError(f"{where}: nvlm does not read Energon's {refused}; remove them or prepare that data apart")
    allowed = ENTRY_KEYS - {"weight" if key == "repetitions" else "repetitions"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; an entry has {sorted(allowed)}")
    value = entry.get(key, 1.0)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise UserError(f"{where}: {key} must be a number >= 0, got {value!r}")
    if not isinstance(entry.get("subflavors") or {}, dict):
        raise UserError(f"{where}: subflavors must be a mapping")
    return float(value), entry
