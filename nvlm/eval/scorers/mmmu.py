"""MMMU (val): rule-based answer parsing, then accuracy per subject, per domain and overall (micro).

official: ``MMMU-Benchmark/MMMU mmmu/utils/eval_utils.py`` (``parse_multi_choice_response``,
``parse_open_response``, ``eval_multi_choice``, ``eval_open``) and ``main_eval_only.py``
(``calculate_ins_level_acc``: domain and overall scores are instance-weighted).

Multiple choice: strip ``, . ! ? ; : '`` (one ``str.strip`` per char, in that order), pad with spaces;
candidates are the choices X with ``(X)`` in the text ("bracket" mode), else those with ``" X "``, else (only
when the text has more than 5 words) those whose option text occurs in it, case-insensitively ("content"
mode). No candidate: ``random.choice(all_choices)`` from a ``random.Random(seed)`` (the reference seeds the
module with 42 at import; results depend on call order, here the input order). Several: the one whose marker
``rfind`` is greatest (first on ties). Correct iff the letter is one of ``answers``.

Open: see ``parse_open_response`` below; correct iff a string prediction *contains* a string answer, or a
float prediction equals a float answer (both rounded to 2 decimals).

nvlm: ``NVIDIA/Megatron-LM examples/multimodal/evaluation/evaluate_mmmu.py`` + ``mmmu_utils.py``: the
response is first reduced to the content of the first ``\\answer{..}`` or ``\\boxed{..}`` (else ``Answer:``
becomes ``Answer: ``); ``X)`` also makes a bracket candidate; no candidate falls back to the **first** choice.

Item fields: ``prediction``, ``answers`` (gold letter(s), or the open answer(s)), ``question_type``
(``multiple-choice`` or ``open``), for multiple choice ``all_choices`` (list) and ``index2ans`` (object);
``subject`` (else taken from an ``id`` like ``validation_Art_Theory_3``).
"""

from __future__ import annotations

import random
import re

import numpy as np

from nvlm.eval.scorers._common import ScoringError, check_mode, mean, require, result, validate_common

DOMAINS = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": ["Basic_Medical_Science", "Clinical_Medicine",
                            "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health"],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": ["Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"],
}  # fmt: skip
SUBJECT_TO_DOMAIN = {s: d for d, subjects in DOMAINS.items() for s in subjects}
INDICATORS = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}
NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
NUM_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def parse_multi_choice(
    response: str,
    all_choices: list[str],
    index2ans: dict[str, str],
    rng: random.Random | None,
    nvlm: bool = False,
) -> tuple[str, bool]:
    """Return (letter, fell_back). ``rng=None`` with no candidate (official) raises LookupError."""
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "
    candidates: list[str] = []
    bracket, content = False, False
    for choice in all_choices:
        if f"({choice})" in response or (nvlm and f"{choice})" in response):
            candidates.append(choice)
            bracket = True
    if not candidates:
        candidates = [c for c in all_choices if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        for index, answer in index2ans.items():
            if answer.lower() in response.lower():
                candidates.append(index)
                content = True
    if not candidates:
        if nvlm:
            return all_choices[0], True
        if rng is None:
            raise LookupError("no candidate and no random generator")
        return rng.choice(all_choices), True
    if len(candidates) == 1:
        return candidates[0], False
    if content:
        positions = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    elif bracket:
        positions = [response.rfind(f"({c})") for c in candidates]
    else:
        positions = [response.rfind(f" {c} ") for c in candidates]
    return candidates[int(np.argmax(positions))], False


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(text: str) -> list[str | float]:
    """Numbers become ``round(float, 2)``; other strings are lower-cased, one-char ones padded with a space."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def extract_numbers(text: str) -> list[str]:
    return NUM_COMMAS.findall(text) + NUM_SCIENTIFIC.findall(text) + NUM_SIMPLE.findall(text)


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    pieces = re.split(r"\.\s(?=[A-Z])|\n", response)  # lower-cased already: only newlines split
    indicators = list(INDICATORS)
    keys = []
    for index, piece in enumerate(pieces):
        if index == len(pieces) - 1:
            indicators.append("=")
        shortest: str | None = None
        for indicator in indicators:
            if indicator in piece:
                tail = piece.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):  # an empty tail is replaced (reference quirk)
                    shortest = tail
        if shortest and shortest.strip() not in TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list[str | float]:
    """The official open-answer parser: key tails, the numbers in them, normalised, de-duplicated."""
    keys = _key_subresponses(response)
    preds: list[str] = list(keys)
    for key in keys:
        preds.extend(extract_numbers(key))
    out: list[str | float] = []
    for pred in preds:
        for value in normalize_str(pred):
            if value not in out:
                out.append(value)
    return out


def eval_open(answers: list[str], preds: list[str | float]) -> bool:
    golds: list[str | float] = []
    for answer in answers:
        golds.extend(normalize_str(answer))
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


def megatron_extract(text: str) -> str:
    """Megatron's ``extract_answer``: first ``\\answer{..}``, else first ``\\boxed{..}`` (non-greedy)."""
    for pattern in (r"\\answer\{(.*?)\}", r"\\boxed\{(.*?)\}"):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return text.replace("Answer:", "Answer: ")


def _subject(item: dict) -> str:
    if isinstance(item.get("subject"), str):
        return item["subject"]
    if isinstance(item.get("id"), str) and item["id"].count("_") >= 2:
        return "_".join(item["id"].split("_")[1:-1])
    return "unknown"


def score_mmmu(items: list[dict], mode: str = "official", seed: int = 42) -> dict:
    check_mode(mode)
    validate_common(items)
    rng = random.Random(seed)
    scores, fallbacks = [], 0
    for i, it in enumerate(items):
        qtype = require(it, i, "question_type", "str", "multiple-choice or open")
        if qtype == "multiple-choice":
            choices = require(it, i, "all_choices", "str_list", 'the option letters, e.g. ["A", "B", "C", "D"]')
            index2ans = require(it, i, "index2ans", "str_dict", 'letter -> option text, e.g. {"A": "..."}')
            text = megatron_extract(it["prediction"]) if mode == "nvlm" else it["prediction"]
            letter, fell_back = parse_multi_choice(text, choices, index2ans, rng, nvlm=mode == "nvlm")
            fallbacks += fell_back
            scores.append(float(letter in it["answers"]))
        elif qtype == "open":
            scores.append(float(eval_open(it["answers"], parse_open_response(it["prediction"]))))
        else:
            raise ScoringError(f'field "question_type" must be "multiple-choice" or "open", got {qtype!r}', i)
    by_subject: dict[str, list[float]] = {}
    for it, s in zip(items, scores):
        by_subject.setdefault(_subject(it), []).append(s)
    by_domain: dict[str, list[float]] = {}
    for subject, vals in by_subject.items():
        by_domain.setdefault(SUBJECT_TO_DOMAIN.get(subject, "Other"), []).extend(vals)
    return result(
        "mmmu",
        mode,
        100.0 * mean(scores),
        scores,
        metric="accuracy (%), micro average over questions",
        by_subject={k: {"score": 100.0 * mean(v), "n": len(v)} for k, v in sorted(by_subject.items())},
        by_domain={k: {"score": 100.0 * mean(v), "n": len(v)} for k, v in sorted(by_domain.items())},
        fallback_choices=fallbacks,
        seed=seed,
    )
