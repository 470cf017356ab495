"""MATH: last-box extraction, remove_boxed, is_equiv and every _strip_string step."""

from __future__ import annotations

import pytest

from nvlm.eval.scorers import ScoringError, score_items
from nvlm.eval.scorers.math_equiv import boxed_answer, is_equiv, last_boxed, strip_string


def test_is_equiv_vectors(vectors):
    for case in vectors["math_is_equiv"]:
        assert is_equiv(case["pred"], case["ref"]) is case["expected"], case


def test_boxed_vectors(vectors):
    for case in vectors["math_boxed_extraction"]:
        assert boxed_answer(case["pred"]) == case["expected"], case


def test_last_boxed_falls_back_to_fbox():
    assert last_boxed("\\fbox{3}") == "\\fbox{3}"  # found, but remove_boxed rejects it
    assert last_boxed("\\boxed{1} \\fbox{2}") == "\\boxed{1}"


@pytest.mark.parametrize(
    ("raw", "stripped"),
    [
        ("a\n\\!b", "ab"),
        ("\\\\frac{1}{2}", "\\frac{1}{2}"),
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("\\left(1,2\\right)", "(1,2)"),
        ("90^{\\circ}", "90"),
        ("90^\\circ", "90"),
        ("\\$5", "5"),
        ("5\\text{ cm}", "5"),
        ("50\\%", "50"),
        ("50%", "50%"),
        ("x .5", "x0.5"),
        ("\\frac{.5}{2}", "\\frac{0.5}{2}"),
        (".75", "0.75"),
        ("", ""),
        ("xy=3", "3"),
        ("abc=3", "abc=3"),
        ("a=b=c", "a=b=c"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("\\sqrt{2}", "\\sqrt{2}"),
        ("\\frac1b", "\\frac{1}{b}"),
        ("\\frac1{b}", "\\frac{1}{b}"),
        ("0.5", "\\frac{1}{2}"),
        ("3/4", "\\frac{3}{4}"),
        ("03/4", "03/4"),
        ("a/4", "a/4"),
    ],
)
def test_strip_steps(raw, stripped):
    assert strip_string(raw) == stripped


def test_exceptions_fall_back_to_raw_compare():
    # two "\text{ " raise inside _strip_string: raw strings are compared instead
    assert is_equiv("1 \\text{ a} \\text{ b}", "1 \\text{ a} \\text{ b}") is True
    assert is_equiv("\\sqrt", "\\sqrt") is True and is_equiv("\\sqrt", "\\sqrt{}") is False
    assert is_equiv(None, None) is True and is_equiv(None, "1") is False


def test_score_items_gold_forms_and_breakdown():
    items = [
        {
            "prediction": "so $\\boxed{\\dfrac12}$",
            "answers": ["... hence $\\boxed{\\frac{1}{2}}$."],
            "level": "Level 2",
        },
        {"prediction": "the answer is 3", "answers": ["3"], "level": "Level 2"},
        {"prediction": "\\boxed{2.0}", "answers": ["2"], "level": "Level 5"},
    ]
    out = score_items("math", items)
    assert out["items"] == [1.0, 0.0, 0.0] and out["no_boxed_answer"] == 1
    assert out["by_level"]["Level 2"] == {"score": 50.0, "n": 2}
    assert score_items("math", items, mode="nvlm")["items"] == out["items"]
    with pytest.raises(ScoringError, match="boxed"):
        score_items("math", [{"prediction": "\\boxed{1}", "answers": ["\\boxed{1"]}])
