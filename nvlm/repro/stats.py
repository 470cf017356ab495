"""The verdict rule of ``nvlm repro``: a pure function of the per-seed numbers, never written by hand.

A claim is a list of comparisons "arm A beats arm B on a metric" (higher is better). Each comparison:

* **holds** when every seed of A is above every seed of B (the min–max ranges across seeds do not overlap);
* **does not hold** when every seed of A is at or below every seed of B;
* **inconclusive** when the ranges overlap, or when an arm has fewer than 2 seeds (no spread to judge by).

The claim holds when all its comparisons hold, does not hold when any does not hold, and is inconclusive
otherwise.
"""

from __future__ import annotations

import statistics
from typing import Any

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
RULE = (
    "each comparison 'A > B' holds when every seed of A is above every seed of B (the min–max ranges across "
    "seeds do not overlap), does not hold when every seed of A is at or below every seed of B, and is "
    "inconclusive when the ranges overlap or an arm has < 2 seeds; the claim holds when all its comparisons "
    "hold, does not hold when any does not, else inconclusive"
)


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max of one arm's per-seed values."""
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def compare(a: list[float], b: list[float]) -> str:
    """Verdict of 'A > B' from the per-seed values of A and B."""
    if len(a) < 2 or len(b) < 2:
        return UNSURE
    if min(a) > max(b):
        return HOLDS
    if max(a) <= min(b):
        return FAILS
    return UNSURE


def verdict(comparisons: list[str]) -> str:
    """The claim's verdict from its comparisons' verdicts."""
    if comparisons and all(c == HOLDS for c in comparisons):
        return HOLDS
    if any(c == FAILS for c in comparisons):
        return FAILS
    return UNSURE
