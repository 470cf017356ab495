"""AI2D and RealWorldQA: option-letter accuracy (no official scorer exists; lmms-eval is the de-facto one).

official, AI2D: ``EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/ai2d`` (2024): the gold is the option letter
``chr(65 + answer_index)``; if the response matches ``^\\s*([A-Z])\\.`` that letter is taken, else the raw
response; then ``exact_match`` with ignore_case and ignore_punctuation (lower-case both, delete every
``string.punctuation`` char, compare). So ``(B)`` and ``b`` are right, ``B moon`` and ``The answer is B.`` wrong.

official, RealWorldQA: ``lmms-eval lmms_eval/tasks/realworldqa`` (2024): a whole response that is a number
word ``zero``..``ten`` becomes the digit; choices come from ``options`` (or are parsed from ``question`` with
``\\b([A-Z])\\.\\s+([^\\n]*)``); the response loses ``[^\\w\\s]`` and is stripped, then the leftmost occurrence of
any choice text (regex alternation) gives that choice's letter, else the cleaned response is kept; then the
same ``exact_match`` against the gold (the letter, or the short answer of open questions).

nvlm (both): ``NVIDIA/Megatron-LM examples/multimodal/evaluation/evaluate_vqav2.py`` (tasks AI2D,
RealworldQA): ``vqa_normalize(prediction) == vqa_normalize(gold)``. Artefact kept: ``a`` is an article, so a
gold ``A`` normalises to ``""`` and any prediction that normalises to empty (``""``, ``"The"``) counts as right.

Item fields: ``prediction``, ``answers`` (AI2D: the letter, the answer index as in lmms-lab/ai2d, or the
option text; RealWorldQA: the letter or the open answer), ``options`` (list of option texts; RealWorldQA may
give ``question`` instead, open questions neither).
"""

from __future__ import annotations

import re
import string

from nvlm.eval.scorers._common import ScoringError, check_mode, mean, require, result, validate_common
from nvlm.eval.scorers.vqa_norm import vqa_normalize

LEADING_LETTER = re.compile(r"^\s*([A-Z])\.")
CHOICE_IN_QUESTION = re.compile(r"\b([A-Z])\.\s+([^\n]*)")
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_PUNCT = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, gold: str) -> bool:
    """lm-eval / lmms-eval ``exact_match`` with ignore_case and ignore_punctuation."""
    return prediction.lower().translate(_PUNCT) == gold.lower().translate(_PUNCT)


def letters_for(options: list[str]) -> list[str]:
    return [chr(ord("A") + i) for i in range(len(options))]


def ai2d_gold(answer: str, options: list[str] | None) -> str:
    """The gold letter from a letter, an answer index (lmms-lab/ai2d) or an option text."""
    answer = answer.strip()
    if options is None:
        if len(answer) == 1 and answer.isupper():
            return answer
        raise ValueError('needs "options" to turn the answer into a letter, or a letter in "answers"')
    letters = letters_for(options)
    if answer in letters:
        return answer
    if answer.isdigit() and int(answer) < len(options):
        return letters[int(answer)]
    if answer in options:
        return letters[options.index(answer)]
    raise ValueError(f"answer {answer!r} is neither an option letter, an index nor an option text")


def ai2d_official(prediction: str, gold_letter: str) -> bool:
    match = LEADING_LETTER.match(prediction)
    return exact_match(match.group(1) if match else prediction, gold_letter)


def realworldqa_filter(prediction: str, options: list[str]) -> str:
    """lmms-eval's NumberWordsToDigits + MultiChoiceRegexFilter for one response."""
    prediction = NUMBER_WORDS.get(prediction.lower(), prediction)
    texts = [o.strip() for o in options]
    to_letter = dict(zip(texts, letters_for(texts)))
    cleaned = re.sub(r"[^\w\s]", "", prediction).strip()
    match = re.compile("|".join(re.escape(t) for t in texts)).search(cleaned)
    if match and match.group() in to_letter:
        return to_letter[match.group()]
    return cleaned


def megatron_choice(prediction: str, gold: str) -> bool:
    return vqa_normalize(prediction) == vqa_normalize(gold)


def _options(item: dict, index: int, required: bool) -> list[str] | None:
    if "options" in item:
        return require(item, index, "options", "str_list0", "the option texts in order A, B, C...")
    if required:
        require(item, index, "options", "str_list", "the option texts in order A, B, C...")
    return None


def score_ai2d(items: list[dict], mode: str = "official") -> dict:
    check_mode(mode)
    validate_common(items)
    scores = []
    for i, it in enumerate(items):
        try:
            gold = ai2d_gold(it["answers"][0], _options(it, i, required=False))
        except ValueError as exc:
            raise ScoringError(f"answers[0]: {exc}", i, "answers") from None
        ok = ai2d_official(it["prediction"], gold) if mode == "official" else megatron_choice(it["prediction"], gold)
        scores.append(float(ok))
    return result("ai2d", mode, 100.0 * mean(scores), scores, metric="accuracy (%)")


def score_realworldqa(items: list[dict], mode: str = "official") -> dict:
    check_mode(mode)
    validate_common(items)
    scores = []
    for i, it in enumerate(items):
        gold = it["answers"][0]
        if mode == "nvlm":
            scores.append(float(megatron_choice(it["prediction"], gold)))
            continue
        options = _options(it, i, required=False)
        if options is None:
            question = it.get("question")
            if question is not None and not isinstance(question, str):
                raise ScoringError('field "question" must be a string', i, "question")
            options = [m[1] for m in CHOICE_IN_QUESTION.findall(question or "")]
        scores.append(float(exact_match(realworldqa_filter(it["prediction"], options), gold)))
    return result("realworldqa", mode, 100.0 * mean(scores), scores, metric="accuracy (%)")
