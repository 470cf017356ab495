"""MathVista: rule extraction, normalisation by answer type and precision, the LLM hook, Megatron's rules."""

from __future__ import annotations

import pytest

from nvlm.eval.scorers import ScoringError, score_items
from nvlm.eval.scorers.mathvista import extract_rules, megatron_correct, normalize_extraction

MC = {
    "question_type": "multi_choice",
    "answer_type": "text",
    "precision": None,
    "choices": ["3", "4", "5", "6"],
}


def _free(answer_type, precision=None):
    return {"question_type": "free_form", "answer_type": answer_type, "precision": precision, "choices": None}


def test_normalisation_vectors(vectors):
    for case in vectors["mathvista_score_from_extraction"]:
        item = {k: case[k] for k in ("question_type", "answer_type", "precision", "choices")}
        got = normalize_extraction(case["extraction"], item)
        assert got == case["expected_prediction"], case
        assert (got == case["answer"]) is case["expected"], case


def test_extraction_rule_vectors(vectors):
    for case in vectors["mathvista_extraction_rules"]:
        item = _free(case["answer_type"])
        got = extract_rules(case["pred"], item)
        assert (got if got is not None else "") == case["expected"], case


def test_extraction_rule_order():
    assert extract_rules("", _free("integer")) == ""
    assert extract_rules("4", MC) == "4"  # equals a choice
    assert extract_rules("14.0", _free("integer")) is None  # int("14.0") fails: would ask the LLM
    assert extract_rules("14", _free("float")) == "14.0"
    assert extract_rules('So: The answer is "x+1".', _free("text")) == "x+1"


def test_normalisation_rules():
    assert normalize_extraction(" (c) five", MC) == "5"  # (X) -> letter, any case
    assert normalize_extraction("D", MC) == "6"
    assert normalize_extraction("E", MC) == "3"  # not a valid letter: nearest text, first on ties
    assert normalize_extraction("-3.9", _free("integer")) == "-3"  # truncation toward zero
    assert normalize_extraction("abc", _free("integer")) is None
    assert normalize_extraction("1.255", _free("float", 2)) == str(round(1.255, 2))
    assert normalize_extraction("2.5", _free("float", None)) == "2"  # round(x, None): banker's rounding to int
    assert normalize_extraction(" [1, 2] ", _free("list")) == " [1, 2] "


def _item(pred, answer, base, **extra):
    return {"prediction": pred, "answers": [answer], **base, **extra}


def test_score_with_fallbacks_and_extraction_field():
    items = [
        _item("B", "4", MC),  # letter: the LLM would extract it
        _item("The answer is 14", "14", _free("integer")),
        _item("whatever", "14", _free("integer"), extraction="14"),  # a stored extraction wins
    ]
    raw = score_items("mathvista", items)
    assert raw["items"] == [1.0, 0.0, 1.0] and raw["needs_extractor"] == 2
    empty = score_items("mathvista", items, fallback="empty")
    # a failed LLM call gives "": for MC the nearest choice by edit distance is then the first, "3"
    assert empty["items"] == [0.0, 0.0, 1.0]
    calls = []

    def llm(response, item):
        calls.append(response)
        return "14" if "14" in response else "4"

    hooked = score_items("mathvista", items, extractor=llm)
    assert hooked["items"] == [1.0, 1.0, 1.0] and calls == ["B", "The answer is 14"]
    assert hooked["by_answer_type"]["integer"] == {"score": 100.0, "n": 2}


def test_nvlm_mode():
    assert megatron_correct("B", MC, "4") is True
    assert megatron_correct("(B) 4", MC, "4") is True
    assert megatron_correct("four", MC, "4") is False  # no letter: Megatron falls back to the first choice
    assert megatron_correct("5", MC, "5") is False  # a bare choice text is no letter: first choice ("3")
    assert megatron_correct("14.567", _free("float", 2), "14.56") is True  # truncated to 2 decimals
    assert megatron_correct("14.00", _free("integer"), "14") is True  # zero decimals dropped
    assert megatron_correct("the answer is 14.5 cm", _free("float", 1), "14.5") is True
    assert megatron_correct("45%", _free("integer"), "45") is True
    assert megatron_correct("12.", _free("integer"), "12") is True
    assert megatron_correct("", _free("integer"), "12") is False  # Megatron would raise IndexError
    assert megatron_correct("-5", _free("integer"), "5") is True  # '-' is punctuation to the VQA normaliser


def test_bad_items():
    with pytest.raises(ScoringError, match="not one of"):
        score_items("mathvista", [_item("B", "7", MC)])
    with pytest.raises(ScoringError, match='"precision"'):
        score_items("mathvista", [_item("1", "1.0", _free("float", "one"))])
    fine = score_items("mathvista", [_item("0.64", "0.6", _free("float", 1.0))])  # HF stores 1.0
    assert fine["items"] == [1.0]
