"""GSM8K: exact match on the final number.

official: ``openai/grade-school-math grade_school_math/dataset.py`` (``extract_answer``, ``is_correct``): the
**first** match of ``#### (\\-?[0-9\\.\\,]+)``, stripped, commas removed; no match gives ``[invalid]``, which is
always wrong. The comparison is between strings: ``72.00`` and ``72.`` do not equal ``72``, ``$72`` does not
match at all. The gold is extracted from the reference solution the same way; a gold given as a bare final
answer (``"72"``, ``"1,000"``) is used as it is, less commas and spaces. Score = 100 * mean.

nvlm: NVIDIA released no Megatron script for GSM8K; ``--mode nvlm`` scores exactly like ``official``.

Item fields: ``prediction`` (the model's full solution, which must end in ``#### N`` as in the 8-shot
train-set format), ``answers`` (the reference solution or its final number; the first is used).
"""

from __future__ import annotations

import re

from nvlm.eval.scorers._common import ScoringError, check_mode, mean, result, validate_common

ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
BARE = re.compile(r"^\s*-?[0-9.,]+\s*$")
INVALID = "[invalid]"


def extract_answer(completion: str) -> str:
    """The reference's ``extract_answer``: first ``#### N``, stripped, commas removed; else ``[invalid]``."""
    match = ANSWER.search(completion)
    if not match:
        return INVALID
    return match.group(1).strip().replace(",", "")


def gold_answer(reference: str) -> str:
    answer = extract_answer(reference)
    if answer != INVALID:
        return answer
    if BARE.match(reference):
        return reference.strip().replace(",", "")
    raise ValueError("has neither '#### N' nor a bare number")


def score_gsm8k(items: list[dict], mode: str = "official") -> dict:
    check_mode(mode)
    validate_common(items)
    scores, invalid = [], 0
    for i, it in enumerate(items):
        try:
            gold = gold_answer(it["answers"][0])
        except ValueError as exc:
            raise ScoringError(f"answers[0] {exc} (give the reference solution or its final number)", i) from None
        pred = extract_answer(it["prediction"])
        invalid += pred == INVALID
        scores.append(float(pred != INVALID and pred == gold))
    return result("gsm8k", mode, 100.0 * mean(scores), scores, metric="accuracy (%)", invalid=invalid)
