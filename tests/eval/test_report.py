"""Run summaries and the Tables 7-8 report, including Text-only Avg. 4 and its change."""

from __future__ import annotations

import json

import pytest

from nvlm.eval.report import (
    build_report,
    format_delta,
    read_summaries,
    render_report,
    text_average,
    write_summary,
)
from nvlm.eval.scorers import score_items

# NVLM-D 1.0 72B and its backbone Qwen2-72B-Instruct, paper Table 8
NVLM_D = {"mmlu": 82.0, "gsm8k": 92.9, "math": 73.1, "humaneval": 88.4}
QWEN2 = {"mmlu": 82.3, "gsm8k": 91.1, "math": 59.7, "humaneval": 86.0}


def _write(folder, scores, mode="official"):
    for task, score in scores.items():
        write_summary(folder, task, {"task": task, "mode": mode, "score": score, "n": 10, "items": [1.0] * 10})


def test_write_summary_format(tmp_path):
    result = score_items("gsm8k", [{"prediction": "#### 1", "answers": ["1"]}])
    path = write_summary(tmp_path, "gsm8k", result)
    assert path == tmp_path / "gsm8k" / "summary.json"
    data = json.loads(path.read_text())
    assert data["task"] == "gsm8k" and data["score"] == 100.0 and data["n"] == 1 and data["mode"] == "official"
    assert data["invalid"] == 0 and "items" not in data
    with_items = json.loads(write_summary(tmp_path, "gsm8k", result, include_items=True).read_text())
    assert with_items["items"] == [1.0]
    with pytest.raises(ValueError, match="score"):
        write_summary(tmp_path, "x", {"n": 1, "mode": "official"})


def test_paper_numbers_reproduce_avg_and_change(tmp_path):
    _write(tmp_path / "nvlm-d", NVLM_D | {"mmmu": 59.7, "ocrbench": 853.0, "docvqa": 92.6})
    _write(tmp_path / "qwen2", QWEN2)
    assert text_average(read_summaries(tmp_path / "nvlm-d")) == pytest.approx(84.1)
    report = build_report(tmp_path / "nvlm-d", tmp_path / "qwen2")
    assert report["backbone"]["avg4"] == pytest.approx(79.775)
    assert report["delta_avg4"] == pytest.approx(4.325)
    text = render_report(report)
    lines = text.splitlines()
    header7 = lines[1].split(" | ")
    assert [h.strip() for h in header7] == ["Tasks", "MMMU val", "MathVista", "VQAv2", "AI2D", "TextVQA", "ChartQA",
                                            "DocVQA", "RealWorldQA", "OCRBench", "Text-only Avg. 4"]  # fmt: skip
    row7 = [c.strip() for c in lines[3].split(" | ")]
    assert row7 == ["nvlm-d", "59.7", "-", "-", "-", "-", "-", "92.6", "-", "853", "+ 4.3"]
    row8_backbone = [c.strip() for c in lines[-2].split(" | ")]
    row8_model = [c.strip() for c in lines[-1].split(" | ")]
    assert row8_backbone == ["qwen2", "N/A", "82.3", "91.1", "59.7", "86.0", "79.8", "N/A"]
    assert row8_model == ["nvlm-d", "qwen2", "82.0", "92.9", "73.1", "88.4", "84.1", "+ 4.3"]


def test_delta_format():
    assert format_delta(-6.94) == "- 6.9"
    assert format_delta(0.04) == "0"
    assert format_delta(2.5) == "+ 2.5"
    assert format_delta(None) == "-"


def test_without_backbone_or_with_missing_text_tasks(tmp_path):
    _write(tmp_path / "run", {"mmlu": 80.0, "gsm8k": 90.0})
    report = build_report(tmp_path / "run")
    assert report["avg4"] is None and "backbone" not in report
    assert "needs --backbone" in render_report(report)
    _write(tmp_path / "base", QWEN2)
    report = build_report(tmp_path / "run", tmp_path / "base")
    assert report["delta_avg4"] is None
    assert "needs MMLU, GSM8K, MATH and HumanEval in both" in render_report(report)


def test_read_summaries_errors(tmp_path):
    (tmp_path / "mmlu").mkdir()
    (tmp_path / "mmlu" / "summary.json").write_text('{"task": "mmlu", "score": "high"}')
    with pytest.raises(ValueError, match="finite number"):
        read_summaries(tmp_path)
    with pytest.raises(ValueError, match="no \\*/summary.json"):
        build_report(tmp_path / "empty")
