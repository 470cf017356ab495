"""Tiny benchmark releases in their real public layouts, official and Hugging Face (parquet written with
pyarrow, image columns as ``datasets`` writes them: a ``{"bytes", "path"}`` struct). Each builder returns
``(--data, right answers, ids)``; the right answers score full marks in both modes."""

from __future__ import annotations

import base64
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
    return [
        parquet(folder / f"{split}-{i:05d}-of-{n:05d}.parquet", rows[i * per : (i + 1) * per])
        for i in range(n)
    ]


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ---- vision -----------------------------------------------------------------------------------------------
def vqav2_hf(root):
    rows = [
        {
            "question_type": "what color",
            "multiple_choice_answer": "red",
            "image_id": 42,
            "answer_type": "other",
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": k} for k, a in enumerate(["red"] * 10)
            ],
            "question_id": 42000 + i,
            "question": f"What color {i}?",
            "image": img(),
        }
        for i in range(3)
    ]
    shards(root / "data", "validation", rows)
    return root, ["red"] * 3, ["42000", "42001", "42002"]


def textvqa_hf(root):
    rows = [
        {
            "image_id": "a1",
            "question_id": 34602,
            "question": "what brand?",
            "answers": ["nokia"] * 10,
            "image": img(),
            "set_name": "val",
        }
    ]
    parquet(root / "data" / "validation-00000-of-00001.parquet", rows)
    return root, ["nokia"], ["34602"]


def docvqa_spdocvqa(root):
    """Today's download: spdocvqa_qas/val_v1.0_withQT.json; images flat in spdocvqa_images/."""
    png(root / "spdocvqa_images" / "pybv0228_81.png")
    write_json(
        root / "spdocvqa_qas" / "val_v1.0_withQT.json",
        {
            "dataset_name": "SP-DocVQA",
            "data": [
                {
                    "questionId": 49153,
                    "question": "What is the date?",
                    "question_types": ["handwritten"],
                    "image": "documents/pybv0228_81.png",
                    "docId": 14465,
                    "answers": ["1/2/2005"],
                    "data_split": "val",
                }
            ],
        },
    )
    return root, ["1/2/2005"], ["49153"]


def docvqa_hf(root):
    rows = [
        {
            "questionId": 49153 + i,
            "question": "What is the date?",
            "question_types": ["form"],
            "image": img(),
            "docId": 1,
            "ucsf_document_id": "x",
            "ucsf_document_page_no": "1",
            "answers": ["1/2/2005"],
            "data_split": "val",
        }
        for i in range(3)
    ]
    shards(root / "DocVQA", "validation", rows)
    return root, ["1/2/2005"] * 3, ["49153", "49154", "49155"]


def chartqa_hf(root):
    rows = [
        {"type": "human_test", "question": "Max?", "answer": "12", "image": img()},
        {"type": "augmented_test", "question": "Up?", "answer": "Yes", "image": img()},
    ]
    parquet(root / "data" / "test-00000-of-00001.parquet", rows)
    return root, ["12", "yes"], ["test_human/0", "test_augmented/0"]


def ocrbench_repo(root):
    """The current repository: OCRBench/json_files/OCRBench.json, images in OCRBench_Images/ above it."""
    png(root / "OCRBench_Images" / "IIIT5K" / "1.png")
    write_json(
        root / "OCRBench" / "json_files" / "OCRBench.json",
        [
            {
                "dataset_name": "IIIT5K",
                "id": 0,
                "image_path": "IIIT5K/1.png",
                "question": "what is written?",
                "answers": ["CENTRE"],
                "type": "Regular Text Recognition",
            }
        ],
    )
    return root / "OCRBench", ["CENTRE"], ["0"]


def ocrbench_hf(root):
    rows = [
        {
            "dataset": "IIIT5K",
            "question": "what is written?",
            "question_type": "Regular Text Recognition",
            "answer": ["CENTRE"],
            "image": img(),
        }
    ]
    parquet(root / "data" / "test-00000-of-00001.parquet", rows)
    return root, ["CENTRE"], ["0"]


AI2D_ROWS = [
    {
        "question": f"Which part is {i}?",
        "options": ["root", "leaf", "stem"],
        "answer": str(i % 3),
        "image": img(),
    }
    for i in range(4)
]


def ai2d_hf(root):
    shards(root / "data", "test", AI2D_ROWS)
    return root, ["A", "B", "C", "A"], ["0", "1", "2", "3"]


def ai2d_tsv(root):
    """VLMEvalKit's AI2D_TEST.tsv: option columns A..D (empty where fewer), letter answers, base64 images."""
    path = root / "AI2D_TEST.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "A", "B", "C", "D", "answer", "image"])
        w.writerow(
            [7, "Which is the leaf?", "root", "leaf", "stem", "", "B", base64.b64encode(png()).decode()]
        )
        w.writerow(
            [9, "Which is the root?", "root", "leaf", "stem", "flower", "A", base64.b64encode(png()).decode()]
        )
    return path, ["B", "A"], ["7", "9"]


def realworldqa_hf(root):
    q = "How many cars?\nA. 1\nB. 2\nC. 3\nPlease answer directly with only the letter of the correct option."
    rows = [{"image": img(), "question": q, "answer": "B"}, {"image": img(), "question": q, "answer": "C"}]
    return shards(root / "data", "test", rows), ["B", "C"], ["0", "1"]  # the shards, given one by one


def mmmu_hf(root):
    for subject, n in (("Art", 2), ("Math", 1)):
        rows = [
            {
                "id": f"validation_{subject}_{i + 1}",
                "question": "<image 1> Which style?",
                "options": "['Cubism', 'Baroque']",
                "explanation": "",
                "image_1": img(),
                "image_2": None,
                "img_type": "['Paintings']",
                "answer": "B",
                "topic_difficulty": "Easy",
                "question_type": "multiple-choice",
                "subfield": "Art History",
            }
            for i in range(n)
        ]
        parquet(root / subject / "validation-00000-of-00001.parquet", rows)
        parquet(root / subject / "dev-00000-of-00001.parquet", [{**rows[0], "id": f"dev_{subject}_1"}])
    return root, ["B"] * 3, ["validation_Art_1", "validation_Art_2", "validation_Math_1"]


MATHVISTA = {
    "1": {
        "question": "Which is bigger?",
        "image": "images/1.jpg",
        "choices": ["3", "4", "5"],
        "unit": None,
        "precision": None,
        "answer": "4",
        "question_type": "multi_choice",
        "answer_type": "text",
        "pid": "1",
        "metadata": {"split": "testmini", "source": "FunctionQA", "grade": "college"},
    },
    "2": {
        "question": "What is x?",
        "image": "images/2.jpg",
        "choices": None,
        "unit": None,
        "precision": None,
        "answer": "14",
        "question_type": "free_form",
        "answer_type": "integer",
        "pid": "2",
        "metadata": {"split": "testmini", "source": "Geometry3K"},
    },
    "3": {
        "question": "How long?",
        "image": "images/3.jpg",
        "choices": None,
        "unit": None,
        "precision": 1.0,
        "answer": "1.2",
        "question_type": "free_form",
        "answer_type": "float",
        "pid": "3",
        "metadata": {"split": "testmini", "source": "SciBench"},
    },
}
QUERIES = {
    "2": "Hint: Please answer the question requiring an integer answer.\nQuestion: What is x?",
    "3": "Hint: Please answer the question requiring a floating-point number with one decimal place.\n"
    "Question: How long?",
}


def mathvista_github(root):
    """lupantech/MathVista: data/testmini.json (keyed by pid, no query), data/query.json, data/images/."""
    for pid in MATHVISTA:
        png(root / "data" / "images" / f"{pid}.jpg")
    write_json(root / "data" / "testmini.json", MATHVISTA)
    write_json(root / "data" / "query.json", {"1": "Hint: ...\nQuestion: Which is bigger?", **QUERIES})
    return root, ["B", "14", "1.2"], ["1", "2", "3"]


def mathvista_hf(root):
    rows = [{**rec, "decoded_image": img(), "query": QUERIES.get(pid, "q")} for pid, rec in MATHVISTA.items()]
    parquet(root / "data" / "testmini-00000-of-00001-725687bf7a18d64b.parquet", rows)
    return root, ["B", "14", "1.2"], ["1", "2", "3"]


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
    parquet(
        root / "abstract_algebra" / "test-00000-of-00001.parquet", test[:1]
    )  # subject copies: not read twice
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
