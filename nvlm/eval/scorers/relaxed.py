"""ChartQA: relaxed accuracy (numbers within 5 % of the target, other answers exact).

official: ``google-research/pix2struct pix2struct/metrics.py`` (``relaxed_correctness``), used verbatim by
lmms-eval's ``chartqa`` task. ``to_float(t)``: ``float(t.rstrip('%')) / 100`` when t ends with ``%``, else
``float(t)``, None on failure (Python's float accepts surrounding spaces, ``"12."`` and ``"1e3"``, not
``"1,000"``). If the prediction parses and the target parses to a **non-zero** number:
``|p - t| / |t| <= 0.05`` (inclusive). Otherwise ``pred.lower() == target.lower()``, so a target of 0 needs a
string match (``"0.0"`` fails against ``"0"``). The item scores the max over its targets; score = 100 * mean,
with the ``human_test`` / ``augmented_test`` splits when items carry ``type`` (the lmms-lab/ChartQA field).

nvlm: ``NVIDIA/Megatron-LM examples/multimodal/evaluation/evaluate_vqav2.py`` (``compute_vqa_accuracy``,
task ChartQA): both sides VQA-normalised (``-`` becomes a space, so signs are lost; digit commas vanish), one
trailing ``%`` run stripped, then ``0.95 * gt <= p <= 1.05 * gt`` when both are numbers (an empty range for a
negative gt), else string equality. Exactly one answer is required.

Item fields: ``prediction`` (str), ``answers`` (list of str; nvlm mode: exactly one). Optional ``type``.
"""

from __future__ import annotations

from collections.abc import Sequence

from nvlm.eval.scorers._common import ScoringError, breakdown, check_mode, mean, result, validate_common
from nvlm.eval.scorers.vqa_norm import vqa_normalize

MAX_RELATIVE_CHANGE = 0.05


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = MAX_RELATIVE_CHANGE) -> bool:
    """pix2struct's relaxed correctness of one (prediction, target) pair."""
    pred_f = _to_float(prediction)
    target_f = _to_float(target)
    if pred_f is not None and target_f:
        return abs(pred_f - target_f) / abs(target_f) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official: 1.0 if the prediction is relaxed-correct against any target."""
    return float(max(relaxed_correctness(prediction, a) for a in answers))


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def relaxed_megatron(prediction: str, answer: str) -> float:
    """NVLM Megatron's ChartQA check of one (prediction, answer) pair."""
    pred = vqa_normalize(prediction).rstrip("%")
    gt = vqa_normalize(answer).rstrip("%")
    if _is_number(pred) and _is_number(gt):
        p, g = float(pred), float(gt)
        return 1.0 if g * 0.95 <= p <= g * 1.05 else 0.0
    return 1.0 if pred == gt else 0.0


def score_chartqa(items: list[dict], mode: str = "official") -> dict:
    check_mode(mode)
    validate_common(items)
    scores = []
    for i, it in enumerate(items):
        if mode == "official":
            scores.append(relaxed_accuracy(it["prediction"], it["answers"]))
        else:
            if len(it["answers"]) != 1:
                raise ScoringError(
                    f'field "answers" must hold exactly one answer in nvlm mode (Megatron asserts it), '
                    f"got {len(it['answers'])}",
                    i,
                    "answers",
                )
            scores.append(relaxed_megatron(it["prediction"], it["answers"][0]))
    extra = breakdown(items, scores, "type")
    return result(
        "chartqa",
        mode,
        100.0 * mean(scores),
        scores,
        metric="relaxed accuracy (%), 5 % tolerance",
        **({"by_type": extra} if extra else {}),
    )
