"""The ``nvlm eval score`` and ``nvlm eval report`` sub-commands on tiny JSONL files."""

from __future__ import annotations

import argparse
import json

import pytest

from nvlm.eval.cli import add_eval_subcommands, score_file
from nvlm.eval.report import write_summary
from nvlm.eval.scorers import SCORERS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvlm eval")
    add_eval_subcommands(parser)
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def _jsonl(path, items, raw_lines=()):
    lines = [json.dumps(item) for item in items] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


ONE_ITEM = {
    "vqav2": {"prediction": "2", "answers": ["2"] * 10},
    "textvqa": {"prediction": "2", "answers": ["2"] * 10},
    "docvqa": {"prediction": "abc", "answers": ["abc"]},
    "chartqa": {"prediction": "12", "answers": ["12"]},
    "ocrbench": {"prediction": "hello", "answers": ["hello"], "type": "Regular Text Recognition",
                 "dataset_name": "IIIT5K"},
    "mmmu": {"prediction": "(B)", "answers": ["B"], "question_type": "multiple-choice", "subject": "Art",
             "all_choices": ["A", "B"], "index2ans": {"A": "x", "B": "y"}},
    "mathvista": {"prediction": "14", "answers": ["14"], "question_type": "free_form", "answer_type": "integer",
                  "precision": None, "choices": None},
    "ai2d": {"prediction": "B", "answers": ["1"], "options": ["sun", "moon"]},
    "realworldqa": {"prediction": "B", "answers": ["B"], "options": ["a car", "a bus"]},
    "gsm8k": {"prediction": "#### 72", "answers": ["... #### 72"]},
    "math": {"prediction": "\\boxed{\\frac12}", "answers": ["$\\boxed{\\frac{1}{2}}$"]},
    "mmlu": {"prediction": "", "answers": ["C"], "logprobs": {"A": -3, "B": -2, "C": -1, "D": -4}},
    "humaneval": {"prediction": "    return a + b\n", "prompt": "def add(a, b):\n",
                  "test": "def check(f):\n    assert f(2, 2) == 4\n", "entry_point": "add"},
}  # fmt: skip


def test_every_task_scores_from_a_file(tmp_path, capsys):
    assert set(ONE_ITEM) == set(SCORERS) and len(SCORERS) == 13
    for task, item in ONE_ITEM.items():
        path = _jsonl(tmp_path / f"{task}.jsonl", [item])
        for mode in ("official", "nvlm"):
            argv = ["score", task, path, "--mode", mode, "--json"] + (["--timeout", "3"] if task == "humaneval" else [])
            assert _run(argv) == 0, task
            out = json.loads(capsys.readouterr().out)
            expected = 1.0 if task == "ocrbench" else 100.0
            assert (out["task"], out["mode"], out["score"], out["items"]) == (task, mode, expected, [1.0]), task


def test_text_output_and_blank_lines(tmp_path, capsys):
    items = [{"prediction": "12", "answers": ["12"], "type": "human_test"},
             {"prediction": "1", "answers": ["12"], "type": "augmented_test"}]  # fmt: skip
    path = _jsonl(tmp_path / "c.jsonl", items[:1], raw_lines=["", json.dumps(items[1])])
    assert _run(["score", "chartqa", path]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("chartqa (official mode): 50.00")
    assert "human_test: score=100.00, n=1" in out


def test_malformed_json_line_names_file_and_line(tmp_path, capsys):
    path = _jsonl(tmp_path / "bad.jsonl", [ONE_ITEM["chartqa"]], raw_lines=['{"prediction": "1", "answers": '])
    assert _run(["score", "chartqa", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{path}:2: not valid JSON")


def test_missing_field_names_the_line_and_the_field(tmp_path, capsys):
    items = [ONE_ITEM["ocrbench"], {"prediction": "x", "answers": ["x"], "type": "Regular Text Recognition"}]
    path = _jsonl(tmp_path / "ocr.jsonl", items, raw_lines=[])
    assert _run(["score", "ocrbench", path]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f'{path}:2: missing field "dataset_name": expected a string (the source data set, e.g. IIIT5K or HME100k)'
    )


def test_wrong_types_and_non_objects(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [ONE_ITEM["gsm8k"]], raw_lines=["", '["not", "an object"]'])
    with pytest.raises(ValueError, match=r"t\.jsonl:3: expected a JSON object"):
        score_file("gsm8k", path)
    path = _jsonl(tmp_path / "u.jsonl", [{"prediction": "#### 1", "answers": "1"}])
    with pytest.raises(ValueError, match=r'u\.jsonl:1: field "answers" must be a non-empty list of strings'):
        score_file("gsm8k", path)
    with pytest.raises(ValueError, match="no items"):
        score_file("gsm8k", _jsonl(tmp_path / "empty.jsonl", [], raw_lines=[""]))
    with pytest.raises(ValueError, match="cannot read"):
        score_file("gsm8k", tmp_path / "absent.jsonl")


def test_cli_arguments(tmp_path, capsys):
    path = _jsonl(tmp_path / "g.jsonl", [ONE_ITEM["gsm8k"]])
    assert _run(["score", "gsm8k", path, "--timeout", "3"]) == 2  # --timeout is for humaneval
    with pytest.raises(SystemExit):
        _parser().parse_args(["score", "nosuchtask", path])
    with pytest.raises(SystemExit):
        _parser().parse_args(["score", "gsm8k", path, "--mode", "lenient"])


def test_report_command(tmp_path, capsys):
    for task, score in {
        "mmlu": 82.0,
        "gsm8k": 92.9,
        "math": 73.1,
        "humaneval": 88.4,
        "ocrbench": 853,
    }.items():
        write_summary(tmp_path / "run", task, {"score": score, "n": 1, "mode": "official"})
    for task, score in {"mmlu": 82.3, "gsm8k": 91.1, "math": 59.7, "humaneval": 86.0}.items():
        write_summary(tmp_path / "base", task, {"score": score, "n": 1, "mode": "official"})
    assert _run(["report", str(tmp_path / "run"), "--backbone", str(tmp_path / "base")]) == 0
    text = capsys.readouterr().out
    assert "Table 7 layout" in text and "Table 8 layout" in text and "+ 4.3" in text and "853" in text
    assert _run(["report", str(tmp_path / "run"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["avg4"] == pytest.approx(84.1) and data["scores"]["ocrbench"] == 853
    assert _run(["report", str(tmp_path / "nothing")]) == 2
    assert "no */summary.json" in capsys.readouterr().err
