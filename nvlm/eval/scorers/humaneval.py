"""HumanEval: functional correctness by execution, unbiased pass@k.

official: ``openai/human-eval human_eval/execution.py`` and ``evaluation.py``. The program is
``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"``; it passes iff it runs to the end within
the timeout (human-eval's default is 3 s; ours 10 s, configurable). Execution: see ``sandbox.py``. Per problem
with n samples of which c pass, ``pass@k = 1 - C(n-c, k) / C(n, k)``, computed stably as
``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` and 1.0 when ``n - c < k``; the benchmark value is the mean over
problems, reported for each k in (1, 10, 100) that every problem's n reaches. Score = 100 * pass@1 (greedy: the
fraction of problems that pass).

nvlm: NVIDIA released no Megatron script for HumanEval; ``--mode nvlm`` scores exactly like ``official``.

Item fields: ``prediction`` (the completion that follows the prompt), ``prompt``, ``test``, ``entry_point``;
optional ``task_id`` groups several samples of one problem (without it every item is its own problem).
Per-item scores: 1.0 if that sample passed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nvlm.eval.scorers._common import check_mode, mean, require, result, validate_common
from nvlm.eval.scorers.sandbox import DEFAULT_TIMEOUT, Limits, Problem, run_problems

KS = (1, 10, 100)


def build_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    return prompt + completion + "\n" + test + "\n" + f"check({entry_point})"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k for one problem (n samples, c correct)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def estimate_pass_at_k(ns: Sequence[int], cs: Sequence[int], k: int) -> float:
    """Mean pass@k over problems."""
    return mean(pass_at_k(n, c, k) for n, c in zip(ns, cs))


def score_humaneval(
    items: list[dict],
    mode: str = "official",
    timeout: float = DEFAULT_TIMEOUT,
    workers: int | None = None,
    unsafe_exec: bool = False,
) -> dict:
    """pass@k of model-written code, each completion run in the sandbox (``nvlm.eval.scorers.sandbox``): the
    candidate and the tests in two isolated processes, the verdict the tests process's exit status, which the
    candidate cannot reach. `unsafe_exec` runs without OS isolation where none is available (said, not silent)."""
    check_mode(mode)
    validate_common(items, need_answers=False)
    problems_in = []
    for i, it in enumerate(items):
        prompt = require(it, i, "prompt", "str", "the HumanEval prompt (signature and docstring)")
        test = require(it, i, "test", "str", "the HumanEval test code defining check(candidate)")
        entry = require(it, i, "entry_point", "str", "the name of the function under test")
        problems_in.append(Problem(prompt, it["prediction"], test, entry))
    statuses = run_problems(problems_in, Limits(timeout=timeout, unsafe_exec=unsafe_exec), workers=workers)
    passed = [1.0 if s == "passed" else 0.0 for s in statuses]
    problems: dict[str, list[float]] = {}
    for i, (it, p) in enumerate(zip(items, passed)):
        key = it.get("task_id")
        problems.setdefault(str(key) if key is not None else f"#item{i}", []).append(p)
    ns = [len(v) for v in problems.values()]
    cs = [int(sum(v)) for v in problems.values()]
    pass_at = {f"pass@{k}": 100.0 * estimate_pass_at_k(ns, cs, k) for k in KS if min(ns) >= k}
    return result(
        "humaneval",
        mode,
        pass_at["pass@1"],
        passed,
        metric="pass@1 (%), unbiased estimator",
        problems=len(problems),
        timeout_s=timeout,
        **pass_at,
        results=statuses,
    )
