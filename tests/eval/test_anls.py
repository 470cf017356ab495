"""DocVQA ANLS: whitespace/case normalisation, raw-length denominator, the 0.5 threshold in both modes."""

from __future__ import annotations

import pytest

from nvlm.eval.scorers import score_items
from nvlm.eval.scorers._common import levenshtein
from nvlm.eval.scorers.anls import anls_megatron, anls_official


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0
    assert levenshtein("straße", "strasse") == 2


def test_vectors_both_modes(vectors):
    for case in vectors["anls"]:
        assert anls_official(case["pred"], case["refs"]) == pytest.approx(case["expected"], abs=1e-4), case
        if "megatron_nvlm" in case:
            assert anls_megatron(case["pred"], case["refs"]) == pytest.approx(case["megatron_nvlm"], abs=1e-4), case


def test_threshold_inclusive_official_strict_nvlm():
    # NL = 0.5 exactly: official keeps 0.5, Megatron drops it; just above 0.5 both give 0
    assert anls_official("abcd", ["abcdefgh"]) == 0.5
    assert anls_megatron("abcd", ["abcdefgh"]) == 0.0
    assert anls_official("abc", ["abcdef"]) == 0.5
    assert anls_official("ab", ["abcde"]) == 0.0


def test_raw_length_quirk():
    # extra spaces do not change the distance (normalised) but enlarge L (raw): 1 - 1/13
    assert anls_official("hello   world", ["hello word"]) == pytest.approx(1 - 1 / 13)
    assert anls_official("hello world", ["hello word"]) == pytest.approx(1 - 1 / 11)
    # 'ß'.upper() == 'SS' adds one to L
    assert anls_official("straße", ["strasse"]) == pytest.approx(1 - 2 / 7)
    assert anls_official("strase", ["strasse"]) == pytest.approx(1 - 1 / 7)


def test_best_answer_wins_and_score_scale():
    out = score_items("docvqa", [{"prediction": "abcdefgh", "answers": ["abcdefgi", "zzzz"]},
                                 {"prediction": "x", "answers": ["y"]}])  # fmt: skip
    assert out["items"] == pytest.approx([0.875, 0.0])
    assert out["score"] == pytest.approx(43.75)


def test_nvlm_mode_vqa_normalises_first():
    # Megatron runs the VQA normaliser first: articles and punctuation vanish before the distance
    assert anls_megatron("The total: $5.", ["total: $5"]) == 1.0
    assert anls_official("The total: $5.", ["total: $5"]) == pytest.approx(1 - 5 / 14)
