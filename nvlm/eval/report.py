"""Run summaries and the report in the layout of the NVLM 1.0 paper's Tables 7 and 8.

A run folder holds one sub-folder per task, each with ``summary.json`` written by ``write_summary``:
``{"task": name, "score": float, "n": int, "mode": "official"|"nvlm", "metric": ..., "scale": ...,
<the scorer's breakdowns>}`` (the per-item scores are left out unless asked for). ``nvlm eval report`` reads
``*/summary.json`` under a folder and prints:

* Table 7: MMMU, MathVista, VQAv2, AI2D, TextVQA, ChartQA, DocVQA, RealWorldQA, OCRBench, Text-only Avg. 4;
* Table 8: MMLU, GSM8K, MATH, HumanEval, Avg. Accuracy, Text-only Avg. 4.

Avg. Accuracy is the mean of the four text scores (only when all four are present). With a backbone folder
(the text-only LLM scored on the same four), "Text-only Avg. 4" is model Avg. minus backbone Avg., printed as in
the paper (``+ 4.3``, ``- 6.9``, ``0``). Scores are shown to one decimal, OCRBench as an integer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

VISION_TASKS = (
    "mmmu",
    "mathvista",
    "vqav2",
    "ai2d",
    "textvqa",
    "chartqa",
    "docvqa",
    "realworldqa",
    "ocrbench",
)
TEXT_TASKS = ("mmlu", "gsm8k", "math", "humaneval")
HEADERS = {
    "mmmu": "MMMU val", "mathvista": "MathVista", "vqav2": "VQAv2", "ai2d": "AI2D", "textvqa": "TextVQA",
    "chartqa": "ChartQA", "docvqa": "DocVQA", "realworldqa": "RealWorldQA", "ocrbench": "OCRBench",
    "mmlu": "MMLU", "gsm8k": "GSM8K", "math": "MATH", "humaneval": "HumanEval",
}  # fmt: skip
SUMMARY = "summary.json"


def write_summary(folder: str | Path, task: str, result: Mapping[str, Any], include_items: bool = False) -> Path:
    """Write ``folder/task/summary.json`` from a scorer result; return its path."""
    for key in ("score", "n", "mode"):
        if key not in result:
            raise ValueError(f"result for {task!r} lacks {key!r}; pass what score_items returned")
    summary: dict[str, Any] = {"task": task, "score": float(result["score"]), "n": int(result["n"])}
    summary["mode"] = result["mode"]
    for key, value in result.items():
        if key not in summary and (include_items or key != "items"):
            summary[key] = value
    path = Path(folder) / task / SUMMARY
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_summaries(folder: str | Path) -> dict[str, dict]:
    """``{task: summary}`` from ``folder/*/summary.json``; ValueError naming the file when one is malformed."""
    found: dict[str, dict] = {}
    for path in sorted(Path(folder).glob(f"*/{SUMMARY}")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not readable JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("task"), str):
            raise ValueError(f'{path}: expected an object with a "task" string')
        score = data.get("score")
        if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score):
            raise ValueError(f'{path}: "score" must be a finite number, got {score!r}')
        if data["task"] in found:
            raise ValueError(f"{path}: a second summary for task {data['task']!r}")
        found[data["task"]] = data
    return found


def text_average(summaries: Mapping[str, Mapping]) -> float | None:
    """Mean of MMLU, GSM8K, MATH and HumanEval, or None when one is missing."""
    if not all(t in summaries for t in TEXT_TASKS):
        return None
    return sum(float(summaries[t]["score"]) for t in TEXT_TASKS) / len(TEXT_TASKS)


def build_report(folder: str | Path, backbone: str | Path | None = None) -> dict:
    """Everything the tables show, as data (``nvlm eval report --json``)."""
    model = read_summaries(folder)
    if not model:
        raise ValueError(f"{folder}: no */{SUMMARY} found")
    out: dict[str, Any] = {
        "name": Path(folder).resolve().name,
        "scores": {t: model[t]["score"] for t in VISION_TASKS + TEXT_TASKS if t in model},
        "modes": sorted({str(s.get("mode")) for s in model.values()}),
        "avg4": text_average(model),
        "other_tasks": sorted(t for t in model if t not in HEADERS),
    }
    if backbone is not None:
        base = read_summaries(backbone)
        if not base:
            raise ValueError(f"{backbone}: no */{SUMMARY} found")
        out["backbone"] = {
            "name": Path(backbone).resolve().name,
            "scores": {t: base[t]["score"] for t in TEXT_TASKS if t in base},
            "avg4": text_average(base),
        }
        both = out["avg4"] is not None and out["backbone"]["avg4"] is not None
        out["delta_avg4"] = out["avg4"] - out["backbone"]["avg4"] if both else None
    return out


def format_score(task: str, value: float | None) -> str:
    if value is None:
        return "-"
    return str(round(value)) if task == "ocrbench" else f"{value:.1f}"


def format_delta(delta: float | None) -> str:
    """The paper's style: ``+ 4.3``, ``- 6.9``, ``0``."""
    if delta is None:
        return "-"
    rounded = round(delta, 1)
    if rounded == 0:
        return "0"
    return f"{'+' if rounded > 0 else '-'} {abs(rounded):.1f}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def render_report(report: Mapping[str, Any]) -> str:
    """Plain-text Tables 7 and 8."""
    scores, name = report["scores"], report["name"]
    base = report.get("backbone")
    delta = format_delta(report.get("delta_avg4")) if base else "-"
    t7 = [["Tasks"] + [HEADERS[t] for t in VISION_TASKS] + ["Text-only Avg. 4"]]
    t7.append([name] + [format_score(t, scores.get(t)) for t in VISION_TASKS] + [delta])
    t8 = [["Tasks", "Backbone LLM"] + [HEADERS[t] for t in TEXT_TASKS] + ["Avg. Accuracy", "Text-only Avg. 4"]]
    if base:
        t8.append(
            [base["name"], "N/A"]
            + [format_score(t, base["scores"].get(t)) for t in TEXT_TASKS]
            + [format_score("", base["avg4"]), "N/A"]
        )
    t8.append(
        [name, base["name"] if base else "-"]
        + [format_score(t, scores.get(t)) for t in TEXT_TASKS]
        + [format_score("", report["avg4"]), delta]
    )
    parts = [
        f"Table 7 layout: vision-language and text-only benchmarks (mode: {', '.join(report['modes'])})",
        _table(t7),
        "",
        "Table 8 layout: text benchmarks",
        _table(t8),
    ]
    if not base:
        parts.append("(Text-only Avg. 4 needs --backbone FOLDER with the backbone LLM's text scores.)")
    elif report.get("delta_avg4") is None:
        parts.append("(Text-only Avg. 4 needs MMLU, GSM8K, MATH and HumanEval in both folders.)")
    if report["other_tasks"]:
        parts.append(f"Not in the paper's tables: {', '.join(report['other_tasks'])}")
    return "\n".join(parts)
