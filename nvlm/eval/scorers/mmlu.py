"""MMLU: the official 5-shot prompt, letter choice by log-probabilities (or by the parsed letter), micro average.

official: ``hendrycks/test evaluate.py`` (``format_subject``, ``format_example``, ``gen_prompt``, ``eval``).
Prompt: ``"The following are multiple choice questions (with answers) about {}.\\n\\n"`` filled with
``format_subject("abstract_algebra") == " abstract algebra"`` (so **two** spaces after "about"); then the first
k=5 dev rows as ``question\\nA. a\\nB. b\\nC. c\\nD. d\\nAnswer: X\\n\\n``; then the test
question in the same format ending in ``Answer:``.

Scoring: when the item carries ``logprobs`` (``{"A": x, ...}`` or the reference's ``{" A": x, ...}``) the letter
is the argmax over A..D (a missing letter counts -100; ties go to the first, as ``np.argmax``). Otherwise the
letter is parsed from ``prediction`` (our rule; the reference has no generative path): the last
``answer is (B)`` / ``answer: B``, else a leading ``B``, ``(B)``, ``B.``, ``B:`` or ``B)``; none -> wrong.
Accuracy = 100 * mean over all questions (micro), with per-subject accuracies.

nvlm: NVIDIA released no Megatron script for MMLU; ``--mode nvlm`` scores exactly like ``official``.

Item fields: ``prediction`` (str, may be ``""`` when logprobs are given), ``answers`` (the letter, or the
0-based index as in cais/mmlu), optional ``logprobs``, ``subject``, ``choices`` (number of options; default 4).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nvlm.eval.scorers._common import (
    ScoringError,
    breakdown,
    check_mode,
    mean,
    require,
    result,
    validate_common,
)

LETTERS = "ABCDEFGHIJ"
MISSING_LOGPROB = -100.0


def format_subject(subject: str) -> str:
    return "".join(" " + part for part in subject.split("_"))


def format_example(question: str, choices: Sequence[str], answer: str | None = None) -> str:
    text = question
    for letter, choice in zip(LETTERS, choices):
        text += f"\n{letter}. {choice}"
    text += "\nAnswer:"
    if answer is not None:
        text += f" {answer}\n\n"
    return text


def _letter(answer: Any) -> str:
    if isinstance(answer, int) and not isinstance(answer, bool):
        return LETTERS[answer]
    answer = str(answer).strip()
    return LETTERS[int(answer)] if answer.isdigit() else answer


def mmlu_prompt(subject: str, dev_examples: Sequence[Any], question: str, choices: Sequence[str], k: int = 5) -> str:
    """The official k-shot prompt (pure function). ``dev_examples``: the subject's dev rows in order, each
    ``{"question", "choices", "answer"}`` or ``(question, choices, answer)``; answer a letter or an index."""
    prompt = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    for row in list(dev_examples)[:k]:
        if isinstance(row, Mapping):
            q, c, a = row["question"], row["choices"], row["answer"]
        else:
            q, c, a = row
        prompt += format_example(q, c, _letter(a))
    return prompt + format_example(question, choices)


def letter_from_logprobs(logprobs: Mapping[str, float], n_choices: int = 4) -> str:
    """Argmax over the option letters; a missing letter gets -100; ties go to the first letter."""
    values = []
    for letter in LETTERS[:n_choices]:
        if " " + letter in logprobs:
            values.append(float(logprobs[" " + letter]))
        else:
            values.append(float(logprobs.get(letter, MISSING_LOGPROB)))
    return LETTERS[int(np.argmax(values))]


def letter_from_text(text: str, n_choices: int = 4) -> str | None:
    letters = LETTERS[:n_choices]
    found = re.findall(rf"(?i:answer)(?: is|:)\s*:?\s*\(?([{letters}])\b", text)
    if found:
        return found[-1]
    lead = re.match(rf"^\s*\(?([{letters}])(?:[.:)]|\s|$)", text)
    return lead.group(1) if lead else None


def score_mmlu(items: list[dict], mode: str = "official") -> dict:
    check_mode(mode)
    validate_common(items)
    scores, by_logprobs = [], 0
    for i, it in enumerate(items):
        n_choices = 4
        if "choices" in it:
            choices = it["choices"]
            n_choices = len(choices) if isinstance(choices, list) else choices
            if not isinstance(n_choices, int) or not 2 <= n_choices <= len(LETTERS):
                raise ScoringError('field "choices" must be the option list or their number (2-10)', i, "choices")
        gold = _letter(it["answers"][0]) if it["answers"][0].strip().isdigit() else it["answers"][0].strip()
        if gold not in LETTERS[:n_choices]:
            raise ScoringError(f"answers[0] must be a letter A-{LETTERS[n_choices - 1]} or an index, got {gold!r}", i)
        if "logprobs" in it:
            logprobs = require(it, i, "logprobs", "dict", 'letter -> log-probability, e.g. {"A": -1.2, ...}')
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in logprobs.values()):
                raise ScoringError('field "logprobs" must map letters to numbers', i, "logprobs")
            pred: str | None = letter_from_logprobs(logprobs, n_choices)
            by_logprobs += 1
        else:
            pred = letter_from_text(it["prediction"], n_choices)
        scores.append(float(pred == gold))
    by_subject = breakdown(items, scores, "subject")
    return result(
        "mmlu",
        mode,
        100.0 * mean(scores),
        scores,
        metric="accuracy (%), micro average",
        scored_by_logprobs=by_logprobs,
        **({"by_subject": by_subject} if by_subject else {}),
    )
