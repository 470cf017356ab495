"""Benchmarks of ``nvlm eval run`` (paper Sec. 6, Tables 7 and 8): ``read_benchmark`` and ``load_benchmark``.

``read_benchmark(task, data)`` reads a benchmark from local files as users download them: the official
release or the Hugging Face parquet release, as a file, several shards (``data`` may be a list) or the
dataset's folder (``LAYOUTS``; the readers are in ``readers_vqa``, ``readers_choice`` and ``readers_text``).
It returns a list of ``Item``: a stable ``id`` (the dataset's own where it has one), the model input
(``prompt``, built by ``nvlm.eval.prompts.build_prompt``), the images in placeholder order and the ``fields``
the scorer needs (named as in ``nvlm/eval/README.md``). Nothing is downloaded. Problems raise ``DataError``
naming the file and the item. ``load_benchmark`` also returns the files read and a ``fingerprint`` of the data,
which a run folder records so that it is never resumed with other data.

Pure Python (no torch): images are only located here, and loaded by the runner.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvlm.eval.items import BASE64, DataError, EncodedImage, Item, ParquetImage
from nvlm.eval.layouts import LAYOUTS
from nvlm.eval.prompts import PROMPTS, VISION, Prompt, build_prompt, mmmu_image_tag, options_text
from nvlm.eval.readers_choice import read_ai2d, read_mathvista, read_mmmu, read_realworldqa
from nvlm.eval.readers_text import read_demo, read_gsm8k, read_humaneval, read_math, read_mmlu
from nvlm.eval.readers_vqa import read_chartqa, read_docvqa, read_ocrbench, read_textvqa, read_vqav2
from nvlm.eval.sources import track

__all__ = [
    "BASE64",
    "LAYOUTS",
    "PROMPTS",
    "READERS",
    "VISION",
    "Benchmark",
    "DataError",
    "EncodedImage",
    "Item",
    "ParquetImage",
    "Prompt",
    "build_prompt",
    "load_benchmark",
    "mmmu_image_tag",
    "options_text",
    "read_benchmark",
]

READERS: dict[str, Callable[[list[Path]], list[Item]]] = {
    "vqav2": read_vqav2, "textvqa": read_textvqa, "docvqa": read_docvqa, "chartqa": read_chartqa,
    "ocrbench": read_ocrbench, "ai2d": read_ai2d, "realworldqa": read_realworldqa, "mmmu": read_mmmu,
    "mathvista": read_mathvista, "mmlu": read_mmlu, "gsm8k": read_gsm8k, "math": read_math,
    "humaneval": read_humaneval, "demo": read_demo,
}  # fmt: skip


@dataclass
class Benchmark:
    items: list[Item]
    files: list[Path]  # the data files read (JSON, CSV, parquet, ...), not the image files

    def fingerprint(self) -> dict[str, Any]:
        """What a run folder records about its data: the files with their sizes, and a hash of every item read
        (id, prompt, answers and fields, image identity), so other data (another shard, another release) is
        told apart even where item ids are positions."""
        digest = hashlib.sha256()
        for it in self.items:
            images = [Path(im).name if isinstance(im, str) else im.identity() for im in it.images]
            digest.update(json.dumps([it.id, it.prompt, it.fields, images], sort_keys=True, default=str).encode())
        files = [{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in self.files]
        return {"items": len(self.items), "items_sha256": digest.hexdigest()[:16], "files": files}


def _paths(task: str, data: str | Path | Sequence[str | Path]) -> list[Path]:
    paths = [Path(d) for d in ([data] if isinstance(data, str | Path) else data)]
    if not paths:
        raise DataError(f"no --data given for {task}: {LAYOUTS[task]}")
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: no such file or folder (--data for {task}: {LAYOUTS[task]})")
    return paths


def load_benchmark(task: str, data: str | Path | Sequence[str | Path]) -> Benchmark:
    """All items of ``task`` under ``data`` (one path, or several shards), in the release's order, with the data
    files read; DataError naming the file on problems."""
    if task not in PROMPTS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(PROMPTS)}")
    paths = _paths(task, data)
    with track() as files:
        items = READERS[task](paths)
    where = ", ".join(map(str, paths))
    if not items:
        raise DataError(f"{where}: no {task} items found (--data for {task}: {LAYOUTS[task]})")
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise DataError(
                f"{where}: item id {it.id!r} occurs twice (the same shard given twice?); ids must be "
                "unique to resume a run"
            )
        seen.add(it.id)
    return Benchmark(items, list(files))


def read_benchmark(task: str, data: str | Path | Sequence[str | Path]) -> list[Item]:
    """``load_benchmark(task, data).items``."""
    return load_benchmark(task, data).items
