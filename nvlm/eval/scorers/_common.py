"""Shared pieces of the scorers: the input error, field validation, edit distance, averages.

Nothing here mirrors an official script; it is plumbing. The scorers import only the standard library,
numpy and this package (never torch or another nvlm subpackage), so ``nvlm eval score`` runs without a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

MODES = ("official", "nvlm")


class ScoringError(ValueError):
    """An item cannot be scored. ``index`` is the 0-based item position (the CLI turns it into a line)."""

    def __init__(self, message: str, index: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index
        self.field = field

    def __str__(self) -> str:
        where = "" if self.index is None else f"item {self.index}: "
        return where + self.message


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def require(item: dict, index: int, field: str, kind: str, why: str = "") -> Any:
    """Return ``item[field]`` after checking its JSON type.

    kind: 'str', 'str_list' (non-empty list of strings), 'str_list0' (possibly empty), 'str_dict',
    'int', 'number', 'bool', 'dict'.
    """
    hint = f" ({why})" if why else ""
    if not isinstance(item, dict):
        raise ScoringError(f"expected a JSON object, got {_type_name(item)}", index)
    if field not in item:
        raise ScoringError(f'missing field "{field}": expected {_describe(kind)}{hint}', index, field)
    value = item[field]
    ok = {
        "str": lambda v: isinstance(v, str),
        "str_list": lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v),
        "str_list0": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "str_dict": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "dict": lambda v: isinstance(v, dict),
    }[kind](value)
    if not ok:
        raise ScoringError(
            f'field "{field}" must be {_describe(kind)}, got {_type_name(value)} {_short(value)}{hint}',
            index,
            field,
        )
    return value


def _describe(kind: str) -> str:
    return {
        "str": "a string",
        "str_list": "a non-empty list of strings",
        "str_list0": "a list of strings",
        "str_dict": "an object of strings",
        "int": "an integer",
        "number": "a number",
        "bool": "true or false",
        "dict": "an object",
    }[kind]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validate_common(items: Sequence[dict], need_answers: bool = True) -> None:
    """Every task needs ``prediction`` (str); most need ``answers`` (non-empty list of str)."""
    if len(items) == 0:
        raise ScoringError("no items to score")
    for i, item in enumerate(items):
        require(item, i, "prediction", "str", "the model's output text")
        if need_answers:
            require(item, i, "answers", "str_list", "the reference answer(s)")


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit costs (insert, delete, substitute), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


def breakdown(items: Sequence[dict], scores: Sequence[float], field: str, scale: float = 100.0) -> dict:
    """{value of ``field``: {"score": mean * scale, "n": count}} over the items that carry the field."""
    groups: dict[str, list[float]] = {}
    for item, score in zip(items, scores):
        value = item.get(field)
        if value is None or isinstance(value, list | dict):
            continue
        groups.setdefault(str(value), []).append(score)
    return {key: {"score": scale * mean(vals), "n": len(vals)} for key, vals in sorted(groups.items())}


def result(task: str, mode: str, score: float, items: Sequence[float], **extra: Any) -> dict:
    """The dict every scorer returns (``score_items`` adds nothing but validation)."""
    out: dict[str, Any] = {"task": task, "mode": mode, "score": float(score), "n": len(items)}
    out.update(extra)
    out["items"] = [float(x) for x in items]
    return out
