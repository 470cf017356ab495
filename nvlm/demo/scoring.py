"""The demo's held-out score for ``nvlm eval run --task demo``: exact match after each synthetic task's own
normalisation (``nvlm.demo.synthetic.score``), overall and per task. Registered with the eval runner by
``nvlm.demo``."""

from __future__ import annotations

from nvlm.demo.synthetic import score
from nvlm.eval.scorers import check_mode


def score_demo(records: list[dict], mode: str) -> dict:
    check_mode(mode)
    scores = [float(score(r["task"], r["prediction"], r["answers"][0])) for r in records]
    groups: dict[str, list[float]] = {}
    for r, s in zip(records, scores):
        groups.setdefault(r["task"], []).append(s)
    return {
        "task": "demo",
        "mode": mode,
        "score": 100.0 * sum(scores) / len(scores),
        "n": len(scores),
        "items": scores,
        "metric": "exact match (%) after nvlm.demo.synthetic.score's normalisation",
        "scale": "accuracy %",
        "by_task": {t: {"score": 100.0 * sum(v) / len(v), "n": len(v)} for t, v in sorted(groups.items())},
    }
