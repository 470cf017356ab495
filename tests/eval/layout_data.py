"""Tiny text-benchmark releases (and the shared helpers) in their real public layouts, official and Hugging Face
(parquet written with pyarrow, image columns as ``datasets`` writes them: a ``{"bytes", "path"}`` struct). Each
builder returns ``(--data, right answers, ids)``; the right answers score full marks in both modes."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def png(path: Path | None = None, size=(64, 48), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def img(name: str = "x.png") -> dict:
    return {"bytes": png(), "path": name}


def parquet(path: Path, rows: list[dict], row_group_size: int = 1) -> Path:
    """One shard; one row per row group, so reading an image finds its row group."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def shards(folder: Path, split: str, rows: list[dict], n: int = 2) -> list[Path]:
    """``rows`` split over ``{split}-0000i-of-0000n.parquet`` as the Hub names shards."""
    per = -(-len(rows) // n)
    return [parquet(folder / f"{split}-{i:05d}-of-{n:05d}.parquet", rows[i * per : (i + 1) * per]) for i in range(n)]


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ---- text -------------------------------------------------------------------------------------------------
CODE_Q = "What does this print?\n```\nfor i in range(2):\n    print(i)\n```"


def mmlu_csv(root):
    """hendrycks/test data/: a question with line breaks inside its quoted field, as the CSVs hold."""
    for split, rows in (
        ("dev", [[f"What is {i}+1?", i, i + 1, i + 2, i + 3, "B"] for i in range(5)]),
        ("test", [[CODE_Q, "0 1", "0\n1", "1 2", "error", "B"], ["Which is even?", 2, 3, 5, 7, "A"]]),
    ):
        (root / "data" / split).mkdir(parents=True)
        with open(root / "data" / split / f"computer_security_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return root / "data", ["B", "A"], ["computer_security/0", "computer_security/1"]


def mmlu_hf(root):
    """cais/mmlu: all/{test,dev}-*.parquet with subject, choices (list) and answer (index)."""
    test = [
        {
            "question": CODE_Q,
            "subject": "computer_security",
            "choices": ["0 1", "0\n1", "1 2", "error"],
            "answer": 1,
        },
        {
            "question": "Which is even?",
            "subject": "computer_security",
            "choices": ["2", "3", "5", "7"],
            "answer": 0,
        },
    ]
    dev = [
        {
            "question": f"What is {i}+1?",
            "subject": "computer_security",
            "choices": [str(i), str(i + 1), str(i + 2), str(i + 3)],
            "answer": 1,
        }
        for i in range(5)
    ]
    parquet(root / "all" / "test-00000-of-00001.parquet", test)
    parquet(root / "all" / "dev-00000-of-00001.parquet", dev)
    parquet(root / "abstract_algebra" / "test-00000-of-00001.parquet", test[:1])  # subject copies: not read twice
    return root, ["B", "A"], ["computer_security/0", "computer_security/1"]


def gsm8k_hf(root):
    rows = [{"question": "Ann has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"}]
    parquet(root / "main" / "test-00000-of-00001.parquet", rows)
    return root, ["#### 7"], ["0"]


def math500(root):
    rows = [
        {
            "problem": "Half of one?",
            "solution": "It is $\\boxed{\\frac{1}{2}}$.",
            "answer": "\\frac{1}{2}",
            "subject": "Algebra",
            "level": 1,
            "unique_id": "test/algebra/1.json",
        }
    ]
    path = root / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, ["So $\\boxed{\\frac12}$"], ["algebra/1"]


def math_hf(root):
    for subject in ("algebra", "geometry"):
        parquet(
            root / subject / "test-00000-of-00001.parquet",
            [
                {
                    "problem": "Half of one?",
                    "level": "Level 1",
                    "type": subject.title(),
                    "solution": "It is $\\boxed{\\frac{1}{2}}$.",
                }
            ],
        )
    return root, ["$\\boxed{0.5}$"] * 2, ["algebra/0", "geometry/0"]


def humaneval_hf(root):
    rows = [
        {
            "task_id": "HumanEval/0",
            "prompt": 'def add(a, b):\n    """Add."""\n',
            "canonical_solution": "",
            "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
            "entry_point": "add",
        }
    ]
    parquet(root / "openai_humaneval" / "test-00000-of-00001.parquet", rows)
    return root, ["    return a + b\n"], ["HumanEval/0"]
