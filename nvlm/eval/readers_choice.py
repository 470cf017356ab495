"""Readers of the multiple-choice and reasoning benchmarks of paper Table 7 (AI2D, RealWorldQA, MMMU,
MathVista): the Hugging Face parquet releases (a shard, the shards, or the dataset's folder), their JSON/JSONL
exports, VLMEvalKit's AI2D TSV and MathVista's GitHub ``data/`` folder. Field types are checked here, so a bad
``answer``/``options``/``choices`` is reported with its item rather than scored as wrong.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from nvlm.eval.items import DataError, Item
from nvlm.eval.prompts import build_prompt
from nvlm.eval.sources import answers, find, get, image, load_json, rows

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SHARDS = ("data/test-*.parquet", "test-*.parquet", "*.tsv", "*.jsonl", "*.json")


def _rid(rec: dict, i: int, *keys: str) -> str:
    return next((str(rec[k]) for k in keys if rec.get(k) is not None), str(i))


def _text_list(value: Any, where: str, name: str) -> list[str]:
    if (
        not isinstance(value, list | tuple)
        or len(value) < 2
        or not all(isinstance(v, str | int | float) for v in value)
    ):
        shown = f"a string ({value[:40]!r}...)" if isinstance(value, str) else repr(value)[:60]
        raise DataError(f"{where}: {name} must be a list of at least 2 option texts, got {shown}")
    return [str(v) for v in value]


def _answer_letter(answer: Any, n: int, where: str) -> str:
    """lmms-lab/ai2d's answer is the option index (``1`` or ``"1"``); VLMEvalKit's is the letter."""
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip() in LETTERS[:n]:
        return answer.strip()
    if isinstance(answer, int | str) and not isinstance(answer, bool) and str(answer).strip().isdigit():
        if int(answer) < n:
            return LETTERS[int(answer)]
    raise DataError(f"{where}: answer {answer!r} is not an option index 0..{n - 1} (or a letter A..{LETTERS[n - 1]})")


# ---- AI2D -------------------------------------------------------------------------------------------------
def read_ai2d(paths: list[Path]) -> list[Item]:
    items: list[Item] = []
    for file in find(paths, "ai2d", SHARDS):
        for where, rec in rows([file]):
            if "options" in rec:  # lmms-lab/ai2d
                options = _text_list(rec["options"], where, "options")
            else:  # VLMEvalKit AI2D_TEST.tsv: one column per option letter, empty where there are fewer
                options = [rec[k] for k in LETTERS if rec.get(k) not in (None, "", "nan")]
                _text_list(options, where, "the option columns A, B, ...")
            img = image(get(rec, "image", where), [file.parent], where)
            prompt = build_prompt("ai2d", get(rec, "question", where), options, num_images=1)
            gold = _answer_letter(get(rec, "answer", where), len(options), where)
            items.append(
                Item(
                    _rid(rec, len(items), "index", "id", "question_id"),
                    prompt,
                    [img],
                    {"answers": [gold], "options": options},
                )
            )
    return items


# ---- RealWorldQA ------------------------------------------------------------------------------------------
def read_realworldqa(paths: list[Path]) -> list[Item]:
    items: list[Item] = []
    for file in find(paths, "realworldqa", SHARDS):
        for where, rec in rows([file]):
            question = get(rec, "question", where)
            img = image(get(rec, "image", where), [file.parent], where)
            items.append(
                Item(
                    _rid(rec, len(items), "id", "question_id"),
                    build_prompt("realworldqa", question, num_images=1),
                    [img],
                    {"answers": answers(get(rec, "answer", where), where), "question": question},
                )
            )
    return items


# ---- MMMU -------------------------------------------------------------------------------------------------
def _literal_list(answer: Any) -> list:
    """MMMU stores some open answers as a list's repr (``"['24/7', '3.429']"``): any of them is right."""
    if isinstance(answer, list):
        return answer
    if isinstance(answer, str) and answer.startswith("["):
        try:
            value = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            return [answer]
        return value if isinstance(value, list) else [answer]
    return [answer]


def _mmmu_options(rec: dict, where: str) -> list[str]:
    options = rec.get("options") or "[]"
    try:  # MMMU keeps the options as a Python list's repr
        options = ast.literal_eval(options) if isinstance(options, str) else options
    except (ValueError, SyntaxError):
        options = None
    if not isinstance(options, list):
        raise DataError(f"{where}: options must be a list (or its Python repr, as MMMU stores it)")
    return [str(o) for o in options]


def read_mmmu(paths: list[Path]) -> list[Item]:
    items: list[Item] = []
    for file in find(paths, "mmmu", ("*/validation-*.parquet", "validation-*.parquet", "**/validation*.json*")):
        for where, rec in rows([file]):
            qtype, options = get(rec, "question_type", where), _mmmu_options(rec, where)
            fields: dict[str, Any] = {
                "answers": [str(a) for a in _literal_list(get(rec, "answer", where))],
                "question_type": qtype,
                "subfield": rec.get("subfield"),
            }
            kind = "open"
            if qtype == "multiple-choice":
                kind, letters = qtype, list(LETTERS[: len(options)])
                fields.update(all_choices=letters, index2ans=dict(zip(letters, options)))
            pics = [rec[f"image_{k}"] for k in range(1, 8) if rec.get(f"image_{k}")]  # single_image: the first
            images = [image(pics[0], [file.parent], where)] if pics else []
            question = str(get(rec, "question", where)).strip()
            prompt = build_prompt("mmmu", question, options, kind, num_images=len(images))
            items.append(Item(str(get(rec, "id", where)), prompt, images, fields))
    return items


# ---- MathVista --------------------------------------------------------------------------------------------
def read_mathvista(paths: list[Path]) -> list[Item]:
    files = find(
        paths,
        "mathvista",
        ("data/testmini-*.parquet", "testmini-*.parquet", "data/testmini.json", "testmini.json"),
    )
    items: list[Item] = []
    for file in files:
        queries: dict | None = None  # the GitHub release keeps each item's query in query.json beside it
        for where, rec in rows([file]):
            qtype = get(rec, "question_type", where)
            choices = rec.get("choices")
            if qtype == "multi_choice":
                choices = _text_list(choices, where, "choices")
                prompt = build_prompt("mathvista", get(rec, "question", where), choices, "multi_choice", 1)
            else:
                query = rec.get("query")
                if query is None:
                    queries = _queries(file) if queries is None else queries
                    query = queries.get(str(get(rec, "pid", where)))
                if not isinstance(query, str):
                    raise DataError(
                        f"{where}: no query for this free-form item (field 'query', or "
                        f"{file.parent / 'query.json'} as in the GitHub release)"
                    )
                prompt = build_prompt("mathvista", query.replace("Hint: ", ""), None, "free_form", 1)
            img = image(rec.get("decoded_image") or rec.get("image"), [file.parent], where)
            meta = md if isinstance(md := rec.get("metadata"), dict) else {}
            fields = {
                "answers": answers(rec.get("answer"), where),
                "question_type": qtype,
                "answer_type": get(rec, "answer_type", where),
                "precision": rec.get("precision"),
                "choices": choices,
                **{k: meta[k] for k in ("source", "category", "task", "context", "grade") if k in meta},
            }
            items.append(Item(_rid(rec, len(items), "pid"), prompt, [img], fields))
    return items


def _queries(file: Path) -> dict:
    path = file.parent / "query.json"
    if not path.is_file():
        return {}
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object mapping pid to query")
    return data
