"""MMLU: the official prompt (two spaces after "about", first k dev rows), log-prob argmax, letter parsing."""

from __future__ import annotations

import pytest

from nvlm.eval.scorers import ScoringError, mmlu_prompt, score_items
from nvlm.eval.scorers.mmlu import letter_from_logprobs, letter_from_text


def test_prompt_vector(vectors):
    case = vectors["mmlu_prompt"][0]
    assert mmlu_prompt(case["subject"], case["dev"], case["question"], case["choices"]) == case["expected"]
    tuples = [(d["question"], d["choices"], d["answer"]) for d in case["dev"]]
    assert mmlu_prompt(case["subject"], tuples, case["question"], case["choices"]) == case["expected"]


def test_prompt_uses_first_k_rows_and_index_answers():
    dev = [{"question": f"q{i}", "choices": ["w", "x", "y", "z"], "answer": i % 4} for i in range(7)]
    prompt = mmlu_prompt("high_school_us_history", dev, "Q?", ["a", "b", "c", "d"])
    assert prompt.startswith(
        "The following are multiple choice questions (with answers) about  high school us history."
    )
    assert prompt.count("\nAnswer:") == 6 and "q5" not in prompt and "q4\nA. w" in prompt
    assert "q1\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n" in prompt
    assert mmlu_prompt("x", dev, "Q?", ["a", "b"], k=0) == (
        "The following are multiple choice questions (with answers) about  x.\n\nQ?\nA. a\nB. b\nAnswer:"
    )


def test_logprob_vectors(vectors):
    for case in vectors["mmlu_scoring"]:
        assert (letter_from_logprobs(case["logprobs"]) == case["ref"]) is case["expected"], case


def test_logprob_keys_with_or_without_space():
    assert letter_from_logprobs({"A": -3.0, "B": -1.0, "C": -2.0, "D": -4.0}) == "B"
    assert letter_from_logprobs({"C": -0.1}, n_choices=4) == "C"


def test_letter_parsing():
    assert letter_from_text("B") == "B"
    assert letter_from_text(" (C) because") == "C"
    assert letter_from_text("D. 42") == "D"
    assert letter_from_text("A good guess; the answer is C.") == "C"  # an explicit answer beats a leading 'A'
    assert letter_from_text("Answer: b") is None  # letters must be capitals
    assert letter_from_text("I am not sure") is None
    assert letter_from_text("E") is None


def test_aggregate_vector_is_micro(vectors):
    case = vectors["mmlu_aggregate"][0]
    items = []
    for subject, row in zip(("algebra", "anatomy"), case["correct"]):
        items += [{"prediction": "A" if ok else "B", "answers": ["A"], "subject": subject} for ok in row]
    out = score_items("mmlu", items)
    assert out["score"] == pytest.approx(100 * case["expected"])
    assert out["by_subject"] == {"algebra": {"score": 50.0, "n": 2}, "anatomy": {"score": 100.0, "n": 3}}
    assert score_items("mmlu", items, mode="nvlm")["items"] == out["items"]


def test_logprobs_take_precedence_and_index_gold():
    items = [{"prediction": "A", "answers": ["1"], "logprobs": {"A": -2, "B": -1}}]
    out = score_items("mmlu", items)
    assert out["items"] == [1.0] and out["scored_by_logprobs"] == 1


def test_bad_items():
    with pytest.raises(ScoringError, match="letter"):
        score_items("mmlu", [{"prediction": "A", "answers": ["Z"]}])
    with pytest.raises(ScoringError, match="logprobs"):
        score_items("mmlu", [{"prediction": "", "answers": ["A"], "logprobs": {"A": "high"}}])
