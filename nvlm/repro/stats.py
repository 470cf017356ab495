"""The verdict rule of ``nvlm repro``: a pure function of the per-seed (or per-round) numbers, never written by
hand.

A claim is a list of comparisons "arm A beats arm B on a metric" (higher is better). Each comparison is judged by
a 95 % percentile-bootstrap interval of the difference of means (A − B), resampling each arm's seeds with
replacement (10 000 resamples, a fixed seed, so a report is reproducible):

* **holds** when the interval lies above 0;
* **contradicted** when it lies below 0;
* **inconclusive** when it covers 0, or when an arm has fewer than 2 seeds (no spread to judge by).

Timing comparisons pair the arms by round instead (the arms are timed interleaved, round after round, on the same
machine): the interval is that of the geometric mean of the per-round ratios A / B, and "A > B" holds when it lies
above 1. A claim whose validity check failed (its reference arm did not learn the task, so the comparison cannot
say anything) is **not tested**, whatever its numbers. Otherwise the claim holds when all its comparisons hold, is
contradicted when any is, and is inconclusive otherwise.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

HOLDS, CONTRADICTED, UNSURE, NOT_TESTED = "holds", "contradicted", "inconclusive", "not tested"
DECIDED = (HOLDS, CONTRADICTED)
RESAMPLES = 10_000
LEVEL = 0.95
RULE = (
    "each comparison 'A > B' holds when the 95 % bootstrap interval of mean(A) − mean(B) over seeds lies above 0 "
    "(timings: of the geometric-mean per-round ratio A / B, above 1), is contradicted when it lies below, and is "
    "inconclusive when it covers 0 (1) or an arm has < 2 seeds; a claim whose validity check fails is not tested; "
    "otherwise it holds when all its comparisons hold, is contradicted when any is, else inconclusive"
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


def _interval(draws: list[float]) -> tuple[float, float]:
    draws.sort()
    tail = (1 - LEVEL) / 2
    return draws[int(tail * (len(draws) - 1))], draws[math.ceil((1 - tail) * (len(draws) - 1))]


def _judge(lo: float, hi: float, zero: float) -> str:
    if lo > zero:
        return HOLDS
    if hi < zero:
        return CONTRADICTED
    return UNSURE


def compare(a: list[float], b: list[float], seed: int = 0) -> dict[str, Any]:
    """'A > B' from the per-seed values of A and B: the difference of means, its bootstrap interval, the verdict."""
    if len(a) < 2 or len(b) < 2:
        diff = statistics.fmean(a) - statistics.fmean(b) if a and b else None
        return {"effect": diff, "low": None, "high": None, "verdict": UNSURE, "kind": "difference"}
    rng = random.Random(seed)
    draws = [
        statistics.fmean(rng.choices(a, k=len(a))) - statistics.fmean(rng.choices(b, k=len(b)))
        for _ in range(RESAMPLES)
    ]
    lo, hi = _interval(draws)
    effect = statistics.fmean(a) - statistics.fmean(b)
    return {"effect": effect, "low": lo, "high": hi, "verdict": _judge(lo, hi, 0.0), "kind": "difference"}


def compare_rounds(a: list[float], b: list[float], seed: int = 0) -> dict[str, Any]:
    """'A > B' from paired per-round values (A and B timed in the same round): the geometric mean of the per-round
    ratios A / B, its bootstrap interval over rounds, the verdict."""
    if len(a) != len(b):
        raise ValueError(f"paired rounds differ in count: {len(a)} vs {len(b)}")
    logs = [math.log(x / y) for x, y in zip(a, b) if x > 0 and y > 0]
    if len(logs) < 2:
        effect = math.exp(logs[0]) if logs else None
        return {"effect": effect, "low": None, "high": None, "verdict": UNSURE, "kind": "ratio"}
    rng = random.Random(seed)
    draws = [statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(RESAMPLES)]
    lo, hi = _interval(draws)
    effect = math.exp(statistics.fmean(logs))
    return {
        "effect": effect,
        "low": math.exp(lo),
        "high": math.exp(hi),
        "verdict": _judge(lo, hi, 0.0),
        "kind": "ratio",
    }


def verdict(comparisons: list[str], valid: bool = True) -> str:
    """The claim's verdict from its comparisons' verdicts and its validity check."""
    if not valid:
        return NOT_TESTED
    if comparisons and all(c == HOLDS for c in comparisons):
        return HOLDS
    if any(c == CONTRADICTED for c in comparisons):
        return CONTRADICTED
    return UNSURE
