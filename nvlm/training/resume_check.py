"""What a run must still be to resume from its checkpoint: the same model, and the same data and blend.

Every checkpoint stores ``fingerprint(cfg)`` in its trainer state (and the whole run config beside it). On
resume ``check_resume`` compares them with the run being started and refuses, naming what changed:

* the model (``model.arch``, ``model.llm``, ``model.vision``, ``model.overrides``, ``train.stage``): the weights
  and optimizer state would not fit, or would silently be trained as another model; no override;
* the data: each source's file content (SHA-256), and the blend (source names, weights, seed). Resuming would
  silently read other samples than the position says; ``train.allow_data_change=true`` accepts it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from nvlm.config import ConfigError
from nvlm.data.sources import kind_of, signature

MODEL_KEYS = (
    ("model", "arch"),
    ("model", "llm"),
    ("model", "vision"),
    ("model", "overrides"),
    ("train", "stage"),
)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(cfg: Any) -> dict[str, Any]:
    """Data and blend fingerprint of a RunConfig: {"data": {name: sha256}, "blend": {"weights", "seed"}}."""
    data, weights = {}, {}
    for spec in cfg.data.source_specs():
        name = spec.name or Path(spec.path).stem
        data[name] = file_sha256(spec.path) if kind_of(spec.path) in ("jsonl", "json") else signature(spec.path)
        weights[name] = float(spec.weight)
    return {"data": data, "blend": {"weights": weights, "seed": cfg.train.seed}}


def _changes(old: dict[str, Any], new: dict[str, Any], what: str) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            out.append(f"{what} {key!r} removed")
        elif key not in old:
            out.append(f"{what} {key!r} added")
        elif old[key] != new[key]:
            out.append(f"{what} {key!r} changed" + ("" if what == "data file of" else f" ({old[key]} -> {new[key]})"))
    return out


def check_resume(checkpoint: Path, cfg: Any, current: dict[str, Any]) -> None:
    """ConfigError if the run being started is not the one `checkpoint` belongs to (see the module doc)."""
    saved_cfg = json.loads((checkpoint / "run_config.json").read_text())
    now = cfg.to_dict()
    for section, key in MODEL_KEYS:
        before, after = saved_cfg.get(section, {}).get(key), now[section][key]
        if json.dumps(before, sort_keys=True) != json.dumps(after, sort_keys=True):
            raise ConfigError(
                f"cannot resume {checkpoint}: {section}.{key} was {_short(before)} there and is {_short(after)} now; "
                f"use a new --out folder for a different model (or restore {section}.{key})"
            )
    ranks = json.loads((checkpoint / "trainer_state.json").read_text()).get("ranks") or [{}]
    saved = ranks[0].get("fingerprint")
    if saved is None or cfg.train.allow_data_change:
        return  # a checkpoint from before fingerprints, or the user accepted the change
    changes = _changes(saved["data"], current["data"], "data file of")
    changes += _changes(saved["blend"]["weights"], current["blend"]["weights"], "blend weight of")
    if saved["blend"]["seed"] != current["blend"]["seed"]:
        changes.append(f"blend seed changed ({saved['blend']['seed']} -> {current['blend']['seed']})")
    if changes:
        raise ConfigError(
            f"cannot resume {checkpoint}: the data changed since it was saved ({'; '.join(changes)}), so the "
            "saved position would silently point at other samples; restore the data, use a new --out folder, "
            "or accept it with train.allow_data_change=true"
        )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
