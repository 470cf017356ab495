"""MATH: the last ``\\boxed{}`` answer, compared with the official ``is_equiv`` string normalisation.

official: ``hendrycks/math modeling/math_equivalence.py`` (``is_equiv``, ``_strip_string``) with
``modeling/dataset/util.py`` (``last_boxed_only_string``) and ``modeling/evaluate_gpt3.py`` (``remove_boxed``).

* ``last_boxed``: the last ``\\boxed`` (else the last ``\\fbox``), scanned forward counting braces to the
  matching ``}``; unbalanced gives None. ``remove_boxed`` needs the prefix ``\\boxed{`` and a final ``}``, so an
  ``\\fbox{..}`` gives None. No answer is wrong.
* ``is_equiv(a, b)``: two Nones are equal, one None is not; else ``strip(a) == strip(b)``, and if ``strip``
  raises, the raw strings are compared.
* ``strip``, in order: delete ``\\n`` and ``\\!``; ``\\\\`` -> ``\\``; ``tfrac``/``dfrac`` -> ``frac``; delete
  ``\\left``, ``\\right``, ``^{\\circ}``, ``^\\circ``, ``\\$``; keep what precedes ``\\text{ `` (which must occur
  once, else it raises); delete ``\\%`` (a plain ``%`` stays); `` .`` -> `` 0.`` and ``{.`` -> ``{0.``; empty ->
  done; a leading ``.`` gets a ``0``; ``a=b`` with a left side of at most 2 chars keeps b; ``\\sqrtX`` ->
  ``\\sqrt{X}``; delete spaces; brace ``\\frac`` arguments (``\\frac12`` -> ``\\frac{1}{2}``); ``0.5`` ->
  ``\\frac{1}{2}``; a canonical ``int/int`` -> ``\\frac{a}{b}``. No numeric equivalence: ``2`` != ``2.0``.

nvlm: NVIDIA released no Megatron script for MATH; ``--mode nvlm`` scores exactly like ``official``.

Item fields: ``prediction`` (the model's solution with a ``\\boxed{}`` answer), ``answers`` (the reference
solution, whose last box is the gold, or the final answer itself; the first is used). Optional ``level`` and
``type`` give breakdowns.
"""

from __future__ import annotations

from nvlm.eval.scorers._common import ScoringError, breakdown, check_mode, mean, result, validate_common


def last_boxed(text: str) -> str | None:
    """``last_boxed_only_string``: the last ``\\boxed{...}`` (or ``\\fbox{...}``) with its braces, or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for pos in range(start, len(text)):
        if text[pos] == "{":
            depth += 1
        elif text[pos] == "}":
            depth -= 1
            if depth == 0:
                return text[start : pos + 1]
    return None


def remove_boxed(boxed: str | None) -> str | None:
    prefix = "\\boxed{"
    if boxed is None or not boxed.startswith(prefix) or not boxed.endswith("}"):
        return None
    return boxed[len(prefix) : -1]


def boxed_answer(text: str) -> str | None:
    return remove_boxed(last_boxed(text))


def _fix_fracs(text: str) -> str:
    parts = text.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part[0] == "{":  # IndexError on an empty part, as in the reference
            out += part
            continue
        if len(part) < 2:
            return text
        a, b, rest = part[0], part[1], part[2:]
        out += "{" + a + "}" + ("{" + b + "}" if b != "{" else b) + rest
    return out


def _fix_a_slash_b(text: str) -> str:
    parts = text.split("/")
    if len(parts) != 2:
        return text
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return text
    if text != f"{a}/{b}":
        return text
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(text: str) -> str:
    if "\\text{ " in text:
        parts = text.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("more than one \\text{ ")  # the reference asserts
        return parts[0]
    return text


def _fix_sqrt(text: str) -> str:
    if "\\sqrt" not in text:
        return text
    parts = text.split("\\sqrt")
    out = parts[0]
    for part in parts[1:]:
        if part[0] != "{":  # IndexError on "\sqrt" at the end, as in the reference
            out += "\\sqrt{" + part[0] + "}" + part[1:]
        else:
            out += "\\sqrt" + part
    return out


def strip_string(text: str) -> str:
    """``_strip_string`` of the reference, step by step."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac")):
        text = text.replace(old, new)
    for junk in ("\\left", "\\right", "^{\\circ}", "^\\circ", "\\$"):
        text = text.replace(junk, "")
    text = _remove_right_units(text)
    text = text.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if len(text) == 0:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        text = sides[1]
    text = _fix_sqrt(text)
    text = text.replace(" ", "")
    text = _fix_fracs(text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _fix_a_slash_b(text)


def is_equiv(a: str | None, b: str | None) -> bool:
    if a is None and b is None:
        return True
    if a is None or b is None:
        return False
    try:
        return strip_string(a) == strip_string(b)
    except (ValueError, IndexError):
        return a == b


def gold_answer(reference: str) -> str | None:
    if "\\boxed" in reference or "\\fbox" in reference:
        return boxed_answer(reference)
    return reference


def score_math(items: list[dict], mode: str = "official") -> dict:
    check_mode(mode)
    validate_common(items)
    scores, unboxed = [], 0
    for i, it in enumerate(items):
        gold = gold_answer(it["answers"][0])
        if gold is None:
            raise ScoringError(
                "answers[0] has a \\boxed/\\fbox answer that cannot be read (unbalanced braces or \\fbox)", i
            )
        pred = boxed_answer(it["prediction"])
        unboxed += pred is None
        scores.append(float(pred is not None and is_equiv(pred, gold)))
    extra = {f"by_{f}": breakdown(items, scores, f) for f in ("level", "type")}
    return result(
        "math",
        mode,
        100.0 * mean(scores),
        scores,
        metric="accuracy (%)",
        no_boxed_answer=unboxed,
        **{k: v for k, v in extra.items() if v},
    )
