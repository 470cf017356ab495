"""Readers of the text benchmarks of paper Table 8 (MMLU, GSM8K, MATH, HumanEval) and of ``nvlm demo``'s
held-out sets: the official releases (MMLU's CSVs, MATH's JSON tree, MATH-500's JSONL, the JSONL files) and the
Hugging Face parquet releases (cais/mmlu, openai/gsm8k, EleutherAI/hendrycks_math, openai/openai_humaneval).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from nvlm.eval.items import DataError, Item
from nvlm.eval.layouts import LAYOUTS
from nvlm.eval.prompts import build_prompt
from nvlm.eval.scorers.mmlu import LETTERS, mmlu_prompt
from nvlm.eval.sources import answers, find, get, image, load_json, note, rows, single

Example = tuple[str, list[str], str]  # question, choices, answer letter


# ---- MMLU -------------------------------------------------------------------------------------------------
def read_mmlu(paths: list[Path]) -> list[Item]:
    if all(p.suffix == ".parquet" or p.is_dir() and next(p.glob("**/test-*.parquet"), None) for p in paths):
        tests = find(paths, "mmlu", ("all/test-*.parquet", "test-*.parquet", "*/test-*.parquet"))
        return _mmlu_items(_mmlu_parquet(tests), _mmlu_parquet(_dev_shards(tests)))
    root = single(paths, "mmlu")
    root = root / "data" if (root / "data" / "test").is_dir() else root
    tests = sorted((root / "test").glob("*_test.csv"))
    if not tests:
        raise DataError(f"{root / 'test'}: no *_test.csv files (--data for mmlu: {LAYOUTS['mmlu']})")
    test_rows: dict[str, list[Example]] = {}
    dev_rows: dict[str, list[Example]] = {}
    for test in tests:
        subject = test.name.removesuffix("_test.csv")
        dev = root / "dev" / f"{subject}_dev.csv"
        if not dev.is_file():
            raise DataError(f"{dev}: missing (the 5-shot examples of {subject})")
        test_rows[subject], dev_rows[subject] = _csv_rows(test), _csv_rows(dev)
    return _mmlu_items(test_rows, dev_rows)


def _csv_rows(path: Path) -> list[Example]:
    """Rows of question, options..., answer letter. The csv module reads the file itself: questions hold line
    breaks inside quoted fields (code, lists), which splitting the text into lines first would lose."""
    note(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows_ = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the CSV file ({exc})") from None
    out = []
    for n, row in enumerate(rows_, 1):
        if len(row) < 4 or row[-1].strip() not in LETTERS[: len(row) - 2]:
            raise DataError(f"{path}: row {n}: expected question, options..., answer letter (got {len(row)} columns)")
        out.append((row[0], row[1:-1], row[-1].strip()))
    return out


def _dev_shards(tests: list[Path]) -> list[Path]:
    devs = sorted({d for t in tests for d in t.parent.glob("dev-*.parquet")})
    if not devs:
        raise DataError(f"{tests[0].parent}: no dev-*.parquet beside the test shards (the 5-shot examples)")
    return devs


def _mmlu_parquet(files: list[Path]) -> dict[str, list[Example]]:
    """cais/mmlu: ``question``, ``subject``, ``choices`` (list), ``answer`` (the index), grouped by subject."""
    out: dict[str, list[Example]] = {}
    for where, rec in rows(files):
        choices, answer = rec.get("choices"), rec.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: choices must be a list of option texts, got {choices!r:.60}")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: answer must be an option index 0..{len(choices) - 1}, got {answer!r}")
        subject = get(rec, "subject", where)
        out.setdefault(subject, []).append((get(rec, "question", where), choices, LETTERS[answer]))
    return out


def _mmlu_items(tests: dict[str, list[Example]], devs: dict[str, list[Example]]) -> list[Item]:
    items = []
    for subject in sorted(tests):
        if subject not in devs:
            raise DataError(f"no dev examples for subject {subject!r} (the 5-shot prompt needs them)")
        for i, (question, choices, answer) in enumerate(tests[subject]):
            prompt = build_prompt("mmlu", mmlu_prompt(subject, devs[subject], question, choices))
            items.append(
                Item(
                    f"{subject}/{i}",
                    prompt,
                    [],
                    {"answers": [answer], "subject": subject, "choices": choices},
                )
            )
    return items


# ---- GSM8K, MATH, HumanEval -------------------------------------------------------------------------------
def read_gsm8k(paths: list[Path]) -> list[Item]:
    files = find(
        paths,
        "gsm8k",
        (
            "test.jsonl",
            "data/test.jsonl",
            "grade_school_math/data/test.jsonl",
            "main/test-*.parquet",
            "test-*.parquet",
        ),
    )
    return [
        Item(
            str(i),
            build_prompt("gsm8k", get(rec, "question", where)),
            [],
            {"answers": answers(get(rec, "answer", where), where)},
        )
        for i, (where, rec) in enumerate(rows(files))
    ]


def read_math(paths: list[Path]) -> list[Item]:
    tables = ("test.jsonl", "*/test-*.parquet", "test-*.parquet")
    if all(p.is_file() or any(next(p.glob(g), None) for g in tables) for p in paths):
        items = []
        for file in find(paths, "math", tables):
            for n, (where, rec) in enumerate(rows([file])):
                uid = rec.get("unique_id")  # MATH-500: test/algebra/1.json, the official id algebra/1
                rid = uid.removeprefix("test/").removesuffix(".json") if isinstance(uid, str) else None
                items.append(_math_item(rec, where, rid or f"{file.parent.name}/{n}"))
        return items
    root = single(paths, "math")
    root = root / "test" if (root / "test").is_dir() else root
    items = []
    for file in sorted(root.rglob("*.json")):
        rec, where = load_json(file), str(file)
        if not isinstance(rec, dict):
            raise DataError(f"{file}: expected a JSON object with problem and solution")
        items.append(_math_item(rec, where, file.relative_to(root).with_suffix("").as_posix()))
    return items


def _math_item(rec: dict, where: str, rid: str) -> Item:
    """Official MATH and EleutherAI/hendrycks_math: problem, solution, level, type; MATH-500: also answer,
    subject, level as a number."""
    level = rec.get("level")
    fields = {
        "answers": [get(rec, "solution", where)],
        "level": f"Level {level}" if isinstance(level, int) else level,
        "type": rec.get("type") or rec.get("subject"),
    }
    return Item(rid, build_prompt("math", get(rec, "problem", where)), [], fields)


def read_humaneval(paths: list[Path]) -> list[Item]:
    files = find(
        paths,
        "humaneval",
        (
            "HumanEval.jsonl.gz",
            "HumanEval.jsonl",
            "data/HumanEval.jsonl.gz",
            "openai_humaneval/test-*.parquet",
            "test-*.parquet",
        ),
    )
    items = []
    for where, rec in rows(files):
        fields = {k: get(rec, k, where) for k in ("task_id", "prompt", "test", "entry_point")}
        items.append(Item(str(fields["task_id"]), build_prompt("humaneval", fields["prompt"]), [], fields))
    return items


# ---- nvlm demo --------------------------------------------------------------------------------------------
def read_demo(paths: list[Path]) -> list[Item]:
    items = []
    for file in find(paths, "demo", ("*.jsonl",)):
        for i, (where, rec) in enumerate(rows([file])):
            turns: Any = get(rec, "conversations", where)
            if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns):
                raise DataError(f"{where}: conversations must hold a question and an answer turn")
            question, answer = turns[0].get("value"), turns[1].get("value")
            pics = rec.get("image") or []
            pics = [pics] if isinstance(pics, str) else pics
            images = [image(p, [file.parent, file.parent.parent], where) for p in pics]
            if images and "<image>" not in str(question):  # as nvlm.data.formats reads LLaVA records
                question = "<image>\n" * len(images) + str(question)
            fields = {"answers": answers(answer, where), "task": rec.get("task", file.stem)}
            rid = next((str(rec[k]) for k in ("id",) if rec.get(k) is not None), str(i))
            items.append(Item(rid, build_prompt("demo", str(question)), images, fields))
    return items
