"""VQAv2 and TextVQA: VQA accuracy (10 human answers, leave-one-out "10 choose 9" averaging).

official, VQAv2: ``GT-Vision-Lab/VQA vqaEval.py`` (``VQAEval.evaluate``). Newlines/tabs become spaces and
both sides are stripped; **only if the GT answers hold more than one distinct string** are the GT answers and the
prediction normalised (punctuation, digits, articles). For each GT answer i, ``acc_i = min(1, #other GT
answers equal to the prediction / 3)``; the question scores ``mean_i acc_i`` (0, .3, .6, .9, 1 for 0-4+
matches out of 10). Dataset score: ``round(100 * mean, 2)``.

official, TextVQA: ``facebookresearch/mmf m4c_evaluators.py`` (``TextVQAAccuracyEvaluator``): the EvalAI
processor is applied to the prediction and to every GT answer, always; exactly 10 answers are required;
the same leave-one-out score. Dataset score: ``100 * mean``.

nvlm (both): ``NVIDIA/Megatron-LM examples/multimodal/evaluation/evaluate_vqav2.py``
(``compute_vqa_accuracy``): prediction and answers always normalised, ``min(1, #matches among all answers / 3)``
with no leave-one-out (1 match = 0.333, 3 = 1.0).

Item fields: ``prediction`` (str), ``answers`` (list of str; TextVQA official: exactly 10). Optional
``answer_type`` / ``question_type`` (VQAv2) give per-type breakdowns.
"""

from __future__ import annotations

from collections.abc import Sequence

from nvlm.eval.scorers._common import ScoringError, breakdown, check_mode, mean, result, validate_common
from nvlm.eval.scorers.vqa_norm import evalai_normalize, vqa_normalize


def leave_one_out(prediction: str, answers: Sequence[str]) -> float:
    """Mean over GT answers i of ``min(1, #(other answers == prediction) / 3)``."""
    total = sum(1 for a in answers if a == prediction)
    accs = []
    for answer in answers:
        others = total - (1 if answer == prediction else 0)
        accs.append(min(1.0, others / 3.0))
    return mean(accs)


def vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQAv2 accuracy of one question, in [0, 1]."""

    def clean(text: str) -> str:
        return text.replace("\n", " ").replace("\t", " ").strip()

    gts = [clean(a) for a in answers]
    pred = clean(prediction)
    if len(set(gts)) > 1:  # the conditional-normalisation quirk
        gts = [vqa_normalize(a) for a in gts]
        pred = vqa_normalize(pred)
    return leave_one_out(pred, gts)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official TextVQA (EvalAI) accuracy of one question, in [0, 1]; needs exactly 10 answers."""
    if len(answers) != 10:
        raise ValueError(f"TextVQA needs exactly 10 answers (the official evaluator asserts it), got {len(answers)}")
    return leave_one_out(evalai_normalize(prediction), [evalai_normalize(a) for a in answers])


def megatron_vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """NVLM Megatron accuracy: always normalised, ``min(1, matches / 3)`` over all answers."""
    pred = vqa_normalize(prediction)
    matches = sum(1 for a in answers if vqa_normalize(a) == pred)
    return min(1.0, matches / 3.0)


def score_vqav2(items: list[dict], mode: str = "official") -> dict:
    check_mode(mode)
    validate_common(items)
    fn = vqav2_accuracy if mode == "official" else megatron_vqa_accuracy
    scores = [fn(it["prediction"], it["answers"]) for it in items]
    total = 100.0 * mean(scores)
    extra = {f"by_{f}": breakdown(items, scores, f) for f in ("answer_type", "question_type")}
    return result(
        "vqav2",
        mode,
        round(total, 2) if mode == "official" else total,
        scores,
        metric="VQA accuracy (%)",
        **{k: v for k, v in extra.items() if v},
    )


def score_textvqa(items: list[dict], mode: str = "official") -> dict:
    check_mode(mode)
    validate_common(items)
    scores = []
    for i, it in enumerate(items):
        if mode == "official":
            if len(it["answers"]) != 10:
                raise ScoringError(
                    f'field "answers" must hold exactly 10 human answers for TextVQA (official evaluator '
                    f"asserts it), got {len(it['answers'])}",
                    i,
                    "answers",
                )
            scores.append(textvqa_accuracy(it["prediction"], it["answers"]))
        else:
            scores.append(megatron_vqa_accuracy(it["prediction"], it["answers"]))
    return result("textvqa", mode, 100.0 * mean(scores), scores, metric="VQA accuracy (%)")
