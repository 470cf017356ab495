"""OCRBench (v1): substring hits summed per category, final score out of 1000.

official: ``Yuliang-Liu/MultimodalOCR OCRBench/example.py`` (the scoring loop and report of ``__main__``).
For ``dataset_name == "HME100k"``: answer and prediction are stripped, newlines turned into spaces, then
**all** spaces removed; the test ``answer in prediction`` is case-sensitive. Otherwise both are lower-cased,
stripped, newlines turned into spaces, and the test is the substring ``answer in prediction`` (an empty answer
matches anything). An item scores 1 if any answer hits (binary). Points are summed per ``type`` (10
categories); Text Recognition = the six recognition categories (out of 300); Final = Text Recognition +
Scene Text-centric VQA + Doc-oriented VQA + Key Information Extraction + HMER (out of 1000 on the full 1000
items). The per-source-dataset accuracies that the reference prints for partial runs are reported too.

nvlm: ``NVIDIA/Megatron-LM examples/multimodal/evaluation/evaluate_ocrbench.py``: the same matching, but +1
for **every** matching answer, so an item can score more than 1.

Item fields: ``prediction`` (str), ``answers`` (list of str), ``type`` (one of ``CATEGORIES``),
``dataset_name`` (str). Per-item scores are points (0/1; nvlm: 0..len(answers)).
"""

from __future__ import annotations

from collections.abc import Sequence

from nvlm.eval.scorers._common import ScoringError, check_mode, require, result, validate_common

RECOGNITION = (
    "Regular Text Recognition",
    "Irregular Text Recognition",
    "Artistic Text Recognition",
    "Handwriting Recognition",
    "Digit String Recognition",
    "Non-Semantic Text Recognition",
)
OTHER = (
    "Scene Text-centric VQA",
    "Doc-oriented VQA",
    "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)
CATEGORIES = RECOGNITION + OTHER
TOTALS = dict.fromkeys(RECOGNITION, 50) | {OTHER[0]: 200, OTHER[1]: 200, OTHER[2]: 200, OTHER[3]: 100}


def _hme(text: str) -> str:
    return text.strip().replace("\n", " ").replace(" ", "")


def _plain(text: str) -> str:
    return text.lower().strip().replace("\n", " ")


def ocrbench_hits(prediction: str, answers: Sequence[str], dataset_name: str) -> int:
    """Number of answers that hit (the official item score is ``min(1, hits)``)."""
    norm = _hme if dataset_name == "HME100k" else _plain
    pred = norm(prediction)
    return sum(1 for answer in answers if norm(answer) in pred)


def score_ocrbench(items: list[dict], mode: str = "official") -> dict:
    check_mode(mode)
    validate_common(items)
    for i, it in enumerate(items):
        kind = require(it, i, "type", "str", "the OCRBench category")
        require(it, i, "dataset_name", "str", "the source data set, e.g. IIIT5K or HME100k")
        if kind not in CATEGORIES:
            raise ScoringError(
                f'field "type" must be one of the 10 OCRBench categories ({", ".join(CATEGORIES)}), got {kind!r}',
                i,
                "type",
            )
    points = []
    for it in items:
        hits = ocrbench_hits(it["prediction"], it["answers"], it["dataset_name"])
        points.append(hits if mode == "nvlm" else min(1, hits))
    per_category = dict.fromkeys(CATEGORIES, 0)
    per_dataset: dict[str, list[int]] = {}
    for it, p in zip(items, points):
        per_category[it["type"]] += p
        per_dataset.setdefault(it["dataset_name"], []).append(p)
    recognition = sum(per_category[c] for c in RECOGNITION)
    final = recognition + sum(per_category[c] for c in OTHER)
    return result(
        "ocrbench",
        mode,
        final,
        points,
        metric="OCRBench points (out of 1000 on the full benchmark)",
        text_recognition=recognition,
        by_category={c: {"score": per_category[c], "total": TOTALS[c]} for c in CATEGORIES},
        by_dataset={name: {"score": 100.0 * sum(v) / len(v), "n": len(v)} for name, v in sorted(per_dataset.items())},
    )
