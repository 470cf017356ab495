"""AI2D and RealWorldQA: letter filters, exact_match with ignore_case/punctuation, Megatron's letter-A artefact."""

from __future__ import annotations

import pytest

from nvlm.eval.scorers import ScoringError, score_items
from nvlm.eval.scorers.choice import ai2d_gold, exact_match, realworldqa_filter

OPTIONS = ["sun", "moon", "earth", "mars"]


def _ai2d(pred, gold, **extra):
    return {"prediction": pred, "answers": [gold], "options": OPTIONS, **extra}


def test_ai2d_vectors_both_modes(vectors):
    for case in vectors["ai2d_accuracy"]:
        item = _ai2d(case["pred"], case["refs"][0])
        assert score_items("ai2d", [item])["items"] == [case["expected"]], case
        assert score_items("ai2d", [item], mode="nvlm")["items"] == [case["megatron_nvlm"]], case


def test_exact_match_ignores_case_and_all_punctuation():
    assert exact_match("(B)!", "b") is True
    assert exact_match("B ", "B") is False  # whitespace is not punctuation


def test_ai2d_gold_forms():
    assert ai2d_gold("1", OPTIONS) == "B"  # lmms-lab/ai2d stores the index
    assert ai2d_gold("moon", OPTIONS) == "B"
    assert ai2d_gold("C", None) == "C"
    with pytest.raises(ValueError):
        ai2d_gold("7", OPTIONS)


def test_ai2d_leading_letter_filter():
    assert score_items("ai2d", [_ai2d("  C. earth is third", "2")])["items"] == [1.0]
    assert score_items("ai2d", [_ai2d("c. earth", "2")])["items"] == [0.0]  # the filter needs a capital


def test_megatron_letter_a_artefact():
    items = [_ai2d(p, "A") for p in ("", "The", "an", "A", "B")]
    assert score_items("ai2d", items, mode="nvlm")["items"] == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert score_items("ai2d", items)["items"] == [0.0, 0.0, 0.0, 1.0, 0.0]


def test_realworldqa_vectors_both_modes(vectors):
    v = vectors["realworldqa_accuracy"]
    for case in v["cases"]:
        item = {"prediction": case["pred"], "answers": case["refs"]}
        if not case.get("open"):
            item["options"] = v["options"]
        assert score_items("realworldqa", [item])["items"] == [case["expected"]], case
        assert score_items("realworldqa", [item], mode="nvlm")["items"] == [case["megatron_nvlm"]], case


def test_realworldqa_filter_details():
    options = ["A car", "A pedestrian"]
    assert realworldqa_filter("TWO", []) == "2"  # whole-response number words only
    assert realworldqa_filter("two cars", []) == "two cars"
    assert realworldqa_filter("I see a car", options) == "I see a car"  # the search is case-sensitive
    assert realworldqa_filter("A pedestrian, then A car", options) == "B"  # leftmost match wins


def test_realworldqa_choices_from_question_text():
    question = "What is ahead?\nA. A car\nB. A pedestrian\nPlease answer directly with only the letter."
    item = {"prediction": "A pedestrian.", "answers": ["B"], "question": question}
    assert score_items("realworldqa", [item])["items"] == [1.0]


def test_bad_items():
    with pytest.raises(ScoringError, match="answers"):
        score_items("ai2d", [{"prediction": "A", "answers": ["water"], "options": OPTIONS}])
    with pytest.raises(ScoringError, match="options"):
        score_items("ai2d", [{"prediction": "A", "answers": ["A"], "options": "sun, moon"}])
