"""Over-long samples are degraded, not dropped: fewer tiles per image until the sample fits the sequence.

NVLM's Megatron example lowers the tile budget 12 → 8 → 6 → 4 → 2 → 1 until a sample fits ``max_seq_len``
(paper §4.1's dynamic tiling at a smaller maximum), so a document page is kept at fewer tiles instead of thrown
away. The ladder here starts at the model's ``tiling.max_tiles`` (or a source's own lower cap, e.g. InternVL's
``max_dynamic_patch``) and takes the rungs below it. A sample that does not fit even at one tile per image (or
a text-only one that is too long) is dropped by the caller; an image block is never cut.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from typing import Any

from nvlm.data.processor import Encoded

LADDER = (12, 8, 6, 4, 2, 1)
_VIEWS: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()


def budgets(top: int) -> list[int]:
    """Tile budgets to try, largest first: `top`, then the ladder's rungs below it."""
    return [top] + [t for t in LADDER if t < top]


def model_max_tiles(processor: Any) -> int | None:
    tiling = getattr(getattr(processor, "config", None), "tiling", None)
    return getattr(tiling, "max_tiles", None)


def at_budget(processor: Any, max_tiles: int) -> Any:
    """`processor` with ``tiling.max_tiles`` lowered to `max_tiles` (a shallow copy sharing its tokenizer)."""
    tiling = processor.config.tiling
    if max_tiles >= tiling.max_tiles:
        return processor
    views = _VIEWS.setdefault(processor, {})
    if max_tiles not in views:
        view = copy.copy(processor)
        lower = dataclasses.replace(tiling, max_tiles=max_tiles, min_tiles=min(tiling.min_tiles, max_tiles))
        view.config = dataclasses.replace(processor.config, tiling=lower)
        views[max_tiles] = view
    return views[max_tiles]


def encode_within(
    processor: Any, segments: list[tuple[str, bool]], images: list[Any], max_len: int, max_tiles: int | None = None
) -> tuple[Encoded, int]:
    """(encoded sample, tile budget used): the largest budget whose encoding fits `max_len` tokens, or the
    smallest one tried when none fits (the caller drops it). `max_tiles` caps the model's budget."""
    top = model_max_tiles(processor)
    if top is None:  # a stand-in without a model config (tests): one encoding
        return processor.encode_segments(segments, images), 0
    ladder = budgets(min(top, max_tiles) if max_tiles else top)
    for k, budget in enumerate(ladder):
        enc = at_budget(processor, budget).encode_segments(segments, images)
        if len(enc.input_ids) <= max_len or not images:
            return enc, budget
        below = ladder[k + 1] if k + 1 < len(ladder) else 0
        if all(plan.num_regular <= below for plan in enc.plans):  # fewer tiles would change nothing
            break
    return enc, budget
