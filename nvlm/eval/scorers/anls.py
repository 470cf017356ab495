"""DocVQA: ANLS (average normalised Levenshtein similarity), threshold tau = 0.5.

official: the RRC / docvqa.org script (``evaluate_method``; verbatim copy in
``QwenLM/Qwen-VL eval_mm/infographicsvqa_eval.py``). Per GT answer g: ``d = Levenshtein(norm(g), norm(p))``
with ``norm(s) = " ".join(s.strip().lower().split())``; ``L = max(len(g.upper()), len(p.upper()))`` on the
**raw** strings (a quirk: extra spaces in the prediction enlarge L, ``"ß".upper() == "SS"`` adds one);
``NL = d / L`` (0 when L == 0). Question score ``s = 1 - min_g NL``, set to 0 when ``s < 0.5`` (so NL exactly
0.5 keeps 0.5). Reported ANLS = ``100 * mean(s)``.

nvlm: ``NVIDIA/Megatron-LM examples/multimodal/evaluation/evaluate_vqav2.py`` (``anls_score``, reached from
``evaluate_spdocvqa.py``): the prediction and the answers are first VQA-normalised, L is taken on the
normalised strings, and a GT counts only when ``NL < 0.5`` (strict: NL = 0.5 scores 0); max over answers.

Item fields: ``prediction`` (str), ``answers`` (list of str).
"""

from __future__ import annotations

from collections.abc import Sequence

from nvlm.eval.scorers._common import check_mode, levenshtein, mean, result, validate_common
from nvlm.eval.scorers.vqa_norm import vqa_normalize

THRESHOLD = 0.5


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls_official(prediction: str, answers: Sequence[str], threshold: float = THRESHOLD) -> float:
    """RRC ANLS of one question, in [0, 1]."""
    pred = _norm(prediction)
    distances = []
    for gt in answers:
        length = max(len(gt.upper()), len(prediction.upper()))
        distances.append(0.0 if length == 0 else levenshtein(_norm(gt), pred) / length)
    score = 1.0 - min(distances)
    return 0.0 if score < threshold else score


def anls_megatron(prediction: str, answers: Sequence[str], threshold: float = THRESHOLD) -> float:
    """Megatron ANLS of one question: VQA-normalised inputs, normalised lengths, strict ``NL < tau``."""
    pred = _norm(vqa_normalize(prediction))
    best = 0.0
    for answer in answers:
        gt = _norm(vqa_normalize(answer))
        length = max(len(gt.upper()), len(pred.upper()))
        nl = 0.0 if length == 0 else levenshtein(gt, pred) / length
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def score_docvqa(items: list[dict], mode: str = "official") -> dict:
    check_mode(mode)
    validate_common(items)
    fn = anls_official if mode == "official" else anls_megatron
    scores = [fn(it["prediction"], it["answers"]) for it in items]
    return result("docvqa", mode, 100.0 * mean(scores), scores, metric="ANLS x 100 (tau = 0.5)")
