"""ChartQA relaxed accuracy: 5 % tolerance (inclusive), % parsing, zero targets, Megatron's variant."""

from __future__ import annotations

import pytest

from nvlm.eval.scorers import ScoringError, score_items
from nvlm.eval.scorers.relaxed import relaxed_accuracy, relaxed_correctness, relaxed_megatron


def test_vectors_both_modes(vectors):
    for case in vectors["chartqa_relaxed_accuracy"]:
        assert relaxed_accuracy(case["pred"], case["refs"]) == case["expected"], case
        if "megatron_nvlm" in case:
            assert relaxed_megatron(case["pred"], case["refs"][0]) == case["megatron_nvlm"], case


def test_tolerance_is_inclusive():
    assert relaxed_correctness("105", "100") is True
    assert relaxed_correctness("95", "100") is True
    assert relaxed_correctness("105.01", "100") is False
    assert relaxed_megatron("105", "100") == 1.0 and relaxed_megatron("105.01", "100") == 0.0


def test_float_parsing_rules():
    assert relaxed_correctness(" 12 ", "12") is True  # float() accepts surrounding spaces
    assert relaxed_correctness("1e3", "1000") is True
    assert relaxed_correctness("5%", "0.05") is True
    assert relaxed_correctness("1,000", "1000") is False  # no float, then string compare fails


def test_zero_target_needs_string_match_and_text_is_case_insensitive():
    assert relaxed_correctness("0", "0") is True
    assert relaxed_correctness("0.0", "0") is False
    assert relaxed_correctness("Yes", "yes") is True


def test_megatron_negative_target_range_is_empty():
    assert relaxed_megatron("-10", "-10") == 1.0  # both lose the sign: 10 vs 10
    assert relaxed_megatron("-9.6", "-10") == 1.0
    assert relaxed_correctness("-9.6", "-10") is True


def test_score_and_split_breakdown():
    items = [
        {"prediction": "12", "answers": ["12"], "type": "human_test"},
        {"prediction": "13", "answers": ["12"], "type": "human_test"},
        {"prediction": "yes", "answers": ["Yes"], "type": "augmented_test"},
    ]
    out = score_items("chartqa", items)
    assert out["score"] == pytest.approx(200 / 3)
    assert out["by_type"]["human_test"] == {"score": 50.0, "n": 2}
    assert out["by_type"]["augmented_test"] == {"score": 100.0, "n": 1}


def test_max_over_targets_official_and_single_answer_nvlm():
    items = [{"prediction": "7", "answers": ["8", "7"]}]
    assert score_items("chartqa", items)["items"] == [1.0]
    with pytest.raises(ScoringError, match="exactly one"):
        score_items("chartqa", items, mode="nvlm")
