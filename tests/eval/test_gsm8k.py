"""GSM8K: first '#### N' extraction, comma removal, string comparison, invalid answers, gold forms."""

from __future__ import annotations

import pytest

from nvlm.eval.scorers import ScoringError, score_items
from nvlm.eval.scorers.gsm8k import INVALID, extract_answer, gold_answer


def test_vectors(vectors):
    for case in vectors["gsm8k"]:
        assert extract_answer(case["pred"]) == case["extracted"], case
        out = score_items("gsm8k", [{"prediction": case["pred"], "answers": case["refs"]}])
        assert out["items"] == [float(case["expected"])], case


def test_gold_forms():
    assert gold_answer("blah\n#### 1,234") == "1234"
    assert gold_answer(" 1,234 ") == "1234"
    with pytest.raises(ValueError):
        gold_answer("seventy-two")


def test_invalid_never_matches_and_is_counted():
    out = score_items("gsm8k", [{"prediction": "no marker", "answers": ["72"]},
                                {"prediction": "#### 72", "answers": ["72"]}])  # fmt: skip
    assert out["items"] == [0.0, 1.0] and out["invalid"] == 1 and out["score"] == 50.0
    assert extract_answer("#### ") == INVALID
    assert score_items("gsm8k", [{"prediction": "#### 5", "answers": ["5"]}], mode="nvlm")["items"] == [1.0]


def test_bad_gold_is_an_error():
    with pytest.raises(ScoringError, match="answers"):
        score_items("gsm8k", [{"prediction": "#### 5", "answers": ["five"]}])
