"""Tiny vision-benchmark releases in their real public layouts, official and Hugging Face (see layout_data)."""

from __future__ import annotations

import base64
import csv

from .layout_data import img, parquet, png, shards, write_json


# ---- vision -----------------------------------------------------------------------------------------------
def vqav2_hf(root):
    rows = [
        {
            "question_type": "what color",
            "multiple_choice_answer": "red",
            "image_id": 42,
            "answer_type": "other",
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k} for k, a in enumerate(["red"] * 10)],
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
        w.writerow([7, "Which is the leaf?", "root", "leaf", "stem", "", "B", base64.b64encode(png()).decode()])
        w.writerow([9, "Which is the root?", "root", "leaf", "stem", "flower", "A", base64.b64encode(png()).decode()])
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
