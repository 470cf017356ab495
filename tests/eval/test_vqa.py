"""VQAv2 / TextVQA: normalisation, conditional normalisation, leave-one-out, Megatron's shortcut."""

from __future__ import annotations

import pytest

from nvlm.eval.scorers import ScoringError, score_items
from nvlm.eval.scorers.vqa import megatron_vqa_accuracy, textvqa_accuracy, vqav2_accuracy
from nvlm.eval.scorers.vqa_norm import (
    CONTRACTIONS,
    evalai_normalize,
    process_digit_article,
    process_punctuation,
    vqa_normalize,
)


def test_normalization_vectors(vectors):
    for case in vectors["vqa_answer_normalization"]:
        assert vqa_normalize(case["pred"]) == case["expected"], case


def test_punctuation_deleted_next_to_space_else_spaced():
    assert process_punctuation("a-b") == "a b"  # no space next to '-': replaced by a space
    assert process_punctuation("a - b") == "a  b"  # ' -' in the text: deleted
    assert process_punctuation("1,000 a-b") == "1000 ab"  # a digit comma anywhere: every mark deleted


def test_marks_outside_the_list_survive():
    assert process_punctuation("50% & $3: ok*#") == "50% & $3: ok*#"


def test_period_rules_and_the_32_limit():
    assert process_punctuation("3.5 3.") == "3.5 3"  # kept before a digit, deleted after one
    assert process_punctuation("." * 40) == "." * 8  # re.UNICODE passed as count: 32 deletions at most


def test_digit_article_and_contractions():
    assert process_digit_article("None of THE Two") == "0 of 2"
    assert process_digit_article("dont") == "don't"
    assert "Im" in CONTRACTIONS and process_digit_article("Im") == "im"  # capitalised keys never fire
    assert len(CONTRACTIONS) == 120


def test_evalai_processor():
    assert evalai_normalize("McDonald's") == "mcdonald 's"
    assert evalai_normalize("What?") == "what"
    assert evalai_normalize("1,000") == "1000"


def test_vqav2_vectors_both_modes(vectors):
    for case in vectors["vqa_accuracy"]:
        assert vqav2_accuracy(case["pred"], case["refs"]) == pytest.approx(case["expected"], abs=1e-4), case
        if "megatron_nvlm" in case:
            got = megatron_vqa_accuracy(case["pred"], case["refs"])
            assert got == pytest.approx(case["megatron_nvlm"], abs=1e-4), case


def test_vqav2_match_count_ladder():
    other = ["zzz"] * 10
    got = [vqav2_accuracy("x", ["x"] * k + other[k:]) for k in range(6)]
    assert got == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0, 1.0])
    assert [megatron_vqa_accuracy("x", ["x"] * k + other[k:]) for k in range(4)] == pytest.approx(
        [0.0, 1 / 3, 2 / 3, 1.0]
    )


def test_vqav2_conditional_normalisation_quirk():
    # identical GT answers: no normalisation at all, so case and number words matter
    assert vqav2_accuracy("Two", ["two"] * 10) == 0.0
    # one differing answer switches normalisation on for both sides
    assert vqav2_accuracy("Two", ["two"] * 9 + ["2"]) == 1.0
    # newlines/tabs become spaces and both sides are stripped even without normalisation
    assert vqav2_accuracy(" red\tcar\n", ["red car"] * 10) == 1.0


def test_vqav2_dataset_score_rounded_and_breakdown():
    items = [
        {"prediction": "yes", "answers": ["yes"] + ["no"] * 9, "answer_type": "yes/no"},
        {"prediction": "2", "answers": ["2"] * 10, "answer_type": "number"},
        {"prediction": "2", "answers": ["2"] * 10, "answer_type": "number"},
    ]
    out = score_items("vqav2", items)
    assert out["score"] == round(100 * (0.3 + 2) / 3, 2) == 76.67
    assert out["items"] == pytest.approx([0.3, 1.0, 1.0])
    assert out["by_answer_type"] == {
        "number": {"score": 100.0, "n": 2},
        "yes/no": {"score": pytest.approx(30.0), "n": 1},
    }
    nv = score_items("vqav2", items, mode="nvlm")
    assert nv["score"] == pytest.approx(100 * (1 / 3 + 2) / 3)


def test_textvqa_vectors_both_modes(vectors):
    for case in vectors["textvqa_accuracy"]:
        assert textvqa_accuracy(case["pred"], case["refs"]) == pytest.approx(case["expected"], abs=1e-4), case
        got = megatron_vqa_accuracy(case["pred"], case["refs"])
        assert got == pytest.approx(case["megatron_nvlm"], abs=1e-4), case


def test_textvqa_needs_ten_answers_in_official_mode_only():
    items = [{"prediction": "a", "answers": ["a"] * 10}, {"prediction": "a", "answers": ["a"] * 3}]
    with pytest.raises(ScoringError) as err:
        score_items("textvqa", items)
    assert err.value.index == 1 and "exactly 10" in err.value.message
    assert score_items("textvqa", items, mode="nvlm")["items"] == [1.0, 1.0]


def test_vqa_rejects_bad_items():
    with pytest.raises(ScoringError) as err:
        score_items("vqav2", [{"prediction": "a", "answers": ["a"]}, {"prediction": 3, "answers": ["a"]}])
    assert err.value.index == 1 and err.value.field == "prediction"
    with pytest.raises(ScoringError, match="answers"):
        score_items("vqav2", [{"prediction": "a", "answers": []}])
