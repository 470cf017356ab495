"""Rewards for GRPO: functions of (prompt, completion, reference) → a float, named in ``train.rl.rewards``.

The answer rewards wrap the evaluation scorers, so a run is rewarded by the metric it is judged by: exact match
(lm-eval's, case and punctuation ignored), relaxed accuracy (ChartQA: 5 % numeric tolerance), ANLS (DocVQA),
VQA accuracy (VQAv2's, normalised, against the one reference) and a numeric answer (the completion's last number
equals the reference's). ``format`` rewards a completion that ended by itself (its end-of-turn token within
``max_new_tokens``) with a non-empty answer. ``register_reward`` adds one of your own.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from nvlm.eval.scorers.anls import anls_official
from nvlm.eval.scorers.choice import exact_match
from nvlm.eval.scorers.relaxed import relaxed_accuracy
from nvlm.eval.scorers.vqa import vqav2_accuracy
from nvlm.eval.scorers.vqa_norm import vqa_normalize


@dataclass(frozen=True)
class Completion:
    """One sampled answer: its text (special tokens dropped) and whether it ended by itself."""

    text: str
    finished: bool


RewardFn = Callable[[str, Completion, str], float]
"""(prompt text, completion, reference answer) → reward."""

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _numeric(prompt: str, c: Completion, reference: str) -> float:
    got, want = _NUMBER.findall(c.text.replace(",", "")), _NUMBER.findall(reference.replace(",", ""))
    return float(bool(got) and bool(want) and float(got[-1]) == float(want[-1]))


REWARDS: dict[str, RewardFn] = {
    "exact_match": lambda p, c, r: float(exact_match(c.text.strip(), r.strip())),
    "relaxed_accuracy": lambda p, c, r: relaxed_accuracy(c.text.strip(), [r.strip()]),
    "anls": lambda p, c, r: anls_official(c.text, [r]),
    # the one reference as all ten annotators, both normalised (VQAv2 normalises only when annotators differ)
    "vqa_accuracy": lambda p, c, r: vqav2_accuracy(vqa_normalize(c.text), [vqa_normalize(r)] * 10),
    "numeric": _numeric,
    "format": lambda p, c, r: float(c.finished and bool(c.text.strip())),
}


def register_reward(name: str, fn: RewardFn) -> None:
    """Make `fn` usable as ``train.rl.rewards=[name]``."""
    REWARDS[name] = fn


def check_rewards(names: list[str] | tuple[str, ...]) -> None:
    """ValueError naming the unknown reward(s) and the known ones."""
    if not names:
        raise ValueError(f"train.rl.rewards is empty; name at least one of {sorted(REWARDS)}")
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"train.rl.rewards: unknown reward(s) {unknown}; known: {sorted(REWARDS)}")


def score(
    names: list[str] | tuple[str, ...], prompts: list[str], completions: list[Completion], references: list[str]
) -> dict[str, list[float]]:
    """{reward name: one value per completion}; `prompts` and `references` are given per completion."""
    check_rewards(names)
    return {n: [REWARDS[n](p, c, r) for p, c, r in zip(prompts, completions, references, strict=True)] for n in names}
