"""MathVista (testmini): answer extraction, normalisation by answer type and precision, exact match.

official: ``lupantech/MathVista evaluation/extract_answer.py`` (``extract_answer``) and
``evaluation/calculate_score.py`` (``normalize_extracted_answer``, ``safe_equal``).

Step A, extraction (rules first, in order): empty response -> ``""``; multi_choice and the response equals a
choice -> the response; answer_type integer and ``int(response)`` works -> ``str(int)``; float and
``float(response)`` works -> ``str(float)`` (``"1e3"`` -> ``"1000.0"``); the quick rule
``The answer is "(.*)"\\.``. Otherwise the reference asks an LLM. Here: an item's own ``extraction`` field wins
over everything; else the ``extractor`` callable ``(response, item) -> str`` if given (the LLM hook); else the
``fallback``: ``"raw"`` (default: the stripped response goes to step B) or ``"empty"`` (exactly what the
reference does when the LLM call fails: ``""``). Items that needed the LLM are counted in ``needs_extractor``.

Step B, normalisation: multi_choice: strip; ``(X)`` -> X upper-cased; a letter among ``A..`` (one per choice)
-> that choice's text; anything else -> the choice at minimum Levenshtein distance (first on ties, so ``"four"``
vs ``["3","4","5","6"]`` gives ``"3"``). integer: ``str(int(float(x)))`` (truncates: ``14.6`` -> ``14``).
float: ``str(round(float(x), precision))``. list: ``str(x)``. Failures give None (wrong).

Step C: ``prediction == answer`` (the dataset's answer string); score = 100 * mean, with breakdowns.

nvlm: ``NVIDIA/Megatron-LM examples/multimodal/evaluation/evaluate_mathvista.py`` (no LLM): multi_choice
uses Megatron's MMMU letter parser against the gold letter; free-form answers are VQA-normalised, then
``extra_processing`` (``^\\d+\\.\\d+$`` truncated to 2 decimals, all-zero decimals dropped, ``%`` removed, one
trailing ``.`` removed) and, when the text has letters and no ``e+``, the first ``answer is -*\\d+\\.*\\d*``
number; the gold gets normalisation and ``extra_processing``; exact string equality. (Megatron raises
IndexError on an empty prediction; we score it 0.)

Item fields: ``prediction``, ``answers`` (the answer string, first used), ``question_type``
(``multi_choice``/``free_form``), ``answer_type`` (``integer``/``float``/``text``/``list``), ``precision``
(int or null; float answers), ``choices`` (list, multi_choice). Optional ``extraction``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from nvlm.eval.scorers._common import (
    ScoringError,
    breakdown,
    check_mode,
    levenshtein,
    mean,
    require,
    result,
    validate_common,
)
from nvlm.eval.scorers.mmmu import parse_multi_choice
from nvlm.eval.scorers.vqa_norm import vqa_normalize

Extractor = Callable[[str, dict], str]
QUICK = re.compile(r'The answer is "(.*)"\.')
BREAKDOWN_FIELDS = ("question_type", "answer_type", "source", "category", "task", "context", "grade")


def extract_rules(response: str, item: dict) -> str | None:
    """The reference's rule tiers (quick extraction on); None when it would ask the LLM."""
    if response == "":
        return ""
    if item["question_type"] == "multi_choice" and response in (item.get("choices") or []):
        return response
    if item["answer_type"] == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if item["answer_type"] == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    match = QUICK.search(response)
    return match.group(1) if match else None


def normalize_extraction(extraction: str, item: dict) -> str | None:
    """``normalize_extracted_answer`` of the reference."""
    if item["question_type"] == "multi_choice":
        choices = item["choices"]
        extraction = extraction.strip()
        letters = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letters:
            extraction = letters[0].upper()
        options = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in options:
            return choices[options.index(extraction)]
        distances = [levenshtein(extraction, c) for c in choices]
        return choices[distances.index(min(distances))]
    try:
        if item["answer_type"] == "integer":
            return str(int(float(extraction)))
        if item["answer_type"] == "float":
            return str(round(float(extraction), item.get("precision")))
    except (ValueError, OverflowError, TypeError):
        return None
    return str(extraction)


def _extra_processing(text: str) -> str:
    match = re.findall(r"^\d+\.\d+$", text)
    if match:
        whole, decimals = match[0].split(".")
        text = match[0][: len(whole)] if all(d == "0" for d in decimals) else match[0][: len(whole) + 3]
    text = text.replace("%", "")
    if text[-1] == ".":  # IndexError on "" as in the reference; the caller handles it
        text = text[:-1]
    return text


def _megatron_extract(text: str) -> str:
    if re.findall(r"[a-zA-Z]+", text) and "e+" not in text:
        template = re.findall(r"answer is -*\d+\.*\d*", text)
        if template:
            numbers = re.findall(r"-*\d+\.*\d*", template[0])
            text = numbers[0] if numbers else template[0]
    return text


def megatron_correct(prediction: str, item: dict, gold: str) -> bool:
    if item["question_type"] == "multi_choice":
        choices = item["choices"]
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        letter, _ = parse_multi_choice(prediction, letters, dict(zip(letters, choices)), None, nvlm=True)
        return letter == letters[choices.index(gold)]
    try:
        pred = _megatron_extract(_extra_processing(vqa_normalize(prediction)))
    except IndexError:
        return False
    return pred == _extra_processing(vqa_normalize(gold))


def _validate(items: list[dict]) -> None:
    validate_common(items)
    for i, it in enumerate(items):
        qtype = require(it, i, "question_type", "str", "multi_choice or free_form")
        atype = require(it, i, "answer_type", "str", "integer, float, text or list")
        if qtype not in ("multi_choice", "free_form"):
            raise ScoringError(f'field "question_type" must be "multi_choice" or "free_form", got {qtype!r}', i)
        if qtype == "multi_choice":
            choices = require(it, i, "choices", "str_list", "the option texts")
            if it["answers"][0] not in choices:
                raise ScoringError(f'answers[0] {it["answers"][0]!r} is not one of "choices"', i, "answers")
        elif atype == "float":
            precision = it.get("precision")
            if isinstance(precision, float) and precision.is_integer():
                it["precision"] = int(precision)  # HF parquet stores 1.0 / 2.0
            elif precision is not None and not isinstance(precision, int):
                raise ScoringError(f'field "precision" must be an integer or null, got {precision!r}', i)
        if "extraction" in it and not isinstance(it["extraction"], str):
            raise ScoringError('field "extraction" must be a string when present', i, "extraction")


def score_mathvista(
    items: list[dict], mode: str = "official", extractor: Extractor | None = None, fallback: str = "raw"
) -> dict:
    check_mode(mode)
    if fallback not in ("raw", "empty"):
        raise ValueError('fallback must be "raw" or "empty"')
    items = [dict(it) if isinstance(it, dict) else it for it in items]
    _validate(items)
    scores, needs_extractor = [], 0
    for i, it in enumerate(items):
        gold = it["answers"][0]
        if mode == "nvlm":
            if it["question_type"] != "multi_choice" and not vqa_normalize(gold):
                raise ScoringError("answers[0] is empty after VQA normalisation (Megatron would crash)", i)
            scores.append(float(megatron_correct(it["prediction"], it, gold)))
            continue
        extraction = it.get("extraction")
        if extraction is None:
            extraction = extract_rules(it["prediction"], it)
        if extraction is None:
            needs_extractor += 1
            if extractor is not None:
                extraction = extractor(it["prediction"], it)
            else:
                extraction = it["prediction"].strip() if fallback == "raw" else ""
        scores.append(float(normalize_extraction(extraction, it) == gold))
    extra = {f"by_{f}": breakdown(items, scores, f) for f in BREAKDOWN_FIELDS}
    return result(
        "mathvista",
        mode,
        100.0 * mean(scores),
        scores,
        metric="accuracy (%)",
        needs_extractor=needs_extractor,
        extractor="callable" if extractor is not None else f"none (fallback {fallback})",
        **{k: v for k, v in extra.items() if v},
    )
