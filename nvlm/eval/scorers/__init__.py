"""Scorers of the 13 NVLM 1.0 benchmarks, each agreeing with the benchmark's official scorer item by item.

``score_items(task, items, mode)`` scores a list of prediction records (one dict per item, see each module's
docstring and ``nvlm/eval/README.md`` for the fields) and returns at least
``{"task", "mode", "score", "n", "items": [per-item score in input order], "metric"}`` plus the
benchmark's breakdowns. ``mode="official"`` (default) follows the official scorer; ``mode="nvlm"`` follows
NVIDIA's Megatron-LM evaluation scripts that produced the paper's numbers (identical to official for the
text benchmarks, for which NVIDIA released none).

Scales (what each benchmark reports): accuracy in % (VQAv2, TextVQA, ChartQA, MMMU, MathVista, AI2D,
RealWorldQA, GSM8K, MATH, MMLU), ANLS x 100 (DocVQA), points out of 1000 (OCRBench), pass@1 in % (HumanEval).
Per-item scores are in [0, 1], except OCRBench (points per item) and HumanEval (1.0 = that sample passed).

These modules import only the standard library and numpy: scoring needs no model, no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nvlm.eval.scorers._common import MODES, ScoringError, check_mode
from nvlm.eval.scorers.anls import score_docvqa
from nvlm.eval.scorers.choice import score_ai2d, score_realworldqa
from nvlm.eval.scorers.gsm8k import score_gsm8k
from nvlm.eval.scorers.humaneval import score_humaneval
from nvlm.eval.scorers.math_equiv import score_math
from nvlm.eval.scorers.mathvista import score_mathvista
from nvlm.eval.scorers.mmlu import mmlu_prompt, score_mmlu
from nvlm.eval.scorers.mmmu import score_mmmu
from nvlm.eval.scorers.ocrbench import score_ocrbench
from nvlm.eval.scorers.relaxed import score_chartqa
from nvlm.eval.scorers.sandbox import SandboxError
from nvlm.eval.scorers.vqa import score_textvqa, score_vqav2

__all__ = ["MODES", "SCORERS", "SandboxError", "Scorer", "ScoringError", "mmlu_prompt", "score_items"]


@dataclass(frozen=True)
class Scorer:
    """One benchmark's scorer: ``fn(items, mode, **options) -> result dict``."""

    task: str
    fn: Callable[..., dict]
    scale: str
    reference: str


SCORERS: dict[str, Scorer] = {
    s.task: s
    for s in (
        Scorer("vqav2", score_vqav2, "accuracy %", "GT-Vision-Lab/VQA vqaEval.py"),
        Scorer("textvqa", score_textvqa, "accuracy %", "facebookresearch/mmf m4c_evaluators.py"),
        Scorer("docvqa", score_docvqa, "ANLS x 100", "RRC DocVQA evaluate_method"),
        Scorer("chartqa", score_chartqa, "relaxed accuracy %", "google-research/pix2struct metrics.py"),
        Scorer("ocrbench", score_ocrbench, "points /1000", "Yuliang-Liu/MultimodalOCR OCRBench/example.py"),
        Scorer("mmmu", score_mmmu, "accuracy %", "MMMU-Benchmark/MMMU eval_utils.py"),
        Scorer("mathvista", score_mathvista, "accuracy %", "lupantech/MathVista evaluation/"),
        Scorer("ai2d", score_ai2d, "accuracy %", "lmms-eval ai2d"),
        Scorer("realworldqa", score_realworldqa, "accuracy %", "lmms-eval realworldqa"),
        Scorer("gsm8k", score_gsm8k, "accuracy %", "openai/grade-school-math dataset.py"),
        Scorer("math", score_math, "accuracy %", "hendrycks/math math_equivalence.py"),
        Scorer("mmlu", score_mmlu, "accuracy %", "hendrycks/test evaluate.py"),
        Scorer("humaneval", score_humaneval, "pass@1 %", "openai/human-eval"),
    )
}


def score_items(task: str, items: list[dict], mode: str = "official", **options: Any) -> dict:
    """Score ``items`` for ``task``. Raises ScoringError (with the item index) for items it cannot score.

    options: ``timeout``/``workers`` (humaneval), ``extractor``/``fallback`` (mathvista), ``seed`` (mmmu).
    """
    if task not in SCORERS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(SCORERS)}")
    check_mode(mode)
    out = SCORERS[task].fn(list(items), mode, **options)
    out.setdefault("scale", SCORERS[task].scale)
    return out
