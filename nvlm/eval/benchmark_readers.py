"""The readers of ``nvlm.eval.benchmarks.read_benchmark``: one per task, each reading the files of the
benchmark's public release (see ``LAYOUTS``). Benchmarks released as parquet are read from their JSON/JSONL
export, with images as paths, base64 strings or ``{"bytes": base64}`` (``datasets``' image columns).
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nvlm.eval.benchmarks import BASE64, LAYOUTS, DataError, EncodedImage, Item, build_prompt
from nvlm.eval.scorers.mmlu import LETTERS, mmlu_prompt


# ---- file helpers -------------------------------------------------------------------------------------------
def _text(path: Path) -> str:
    try:
        raw = path.read_bytes()
        return (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise DataError(f"{path}: cannot read the file ({exc})") from None


def _json(path: Path) -> Any:
    try:
        return json.loads(_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _records(path: Path) -> list[tuple[str, dict]]:
    """(where, record) from JSONL(.gz), a JSON list, ``{"data": [...]}`` or a JSON object of records."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a JSON or JSONL file")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        out = []
        for n, line in enumerate(_text(path).splitlines(), 1):
            if line.strip():
                try:
                    out.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    else:
        data = _json(path)
        if isinstance(data, dict):
            data = data["data"] if isinstance(data.get("data"), list) else list(data.values())
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of records")
        out = [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]
    for where, rec in out:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return out


def _get(rec: dict, key: str, where: str) -> Any:
    if rec.get(key) is None:
        raise DataError(f"{where}: missing field {key!r}")
    return rec[key]


def _image(value: Any, roots: list[Path], where: str) -> str | EncodedImage:
    """A path (resolved under ``roots``), a base64 string, or ``{"bytes": ..., "path": ...}``."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return EncodedImage(value["bytes"], where)
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: no image (expected a path, base64 or {{\"bytes\": base64}})")
    if len(value) < 1024:
        for root in roots:
            if (root / value).is_file():
                return str(root / value)
    encoded = value.split("base64,", 1)[-1] if value.startswith("data:") else value
    if len(encoded) >= 128 and BASE64.fullmatch(encoded):
        return EncodedImage(encoded, where)
    tried = ", ".join(str(r) for r in roots)
    raise DataError(f"{where}: image {value!r} not found under {tried}")


def _answers(value: Any, where: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values or any(v is None for v in values):
        raise DataError(f"{where}: no answer")
    return [str(v) for v in values]


def _folder_file(path: Path, names: tuple[str, ...], task: str) -> Path:
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    raise DataError(f"{path}: holds none of {', '.join(names)} (--data for {task}: {LAYOUTS[task]})")


# ---- readers ------------------------------------------------------------------------------------------------
def read_vqav2(path: Path) -> list[Item]:
    folder = path if path.is_dir() else path.parent
    found = [path] if path.is_file() else sorted(folder.glob("*questions*.json"))
    if len(found) != 1:
        found = [p for p in found if "val" in p.name] or found
    if len(found) != 1:
        raise DataError(f"{path}: expected one *questions*.json, found {[p.name for p in found] or 'none'}")
    questions = _json(found[0])
    subtype = questions.get("data_subtype", "val2014") if isinstance(questions, dict) else "val2014"
    anns = sorted(folder.glob(f"*{subtype}*annotations*.json"))
    if not anns:
        raise DataError(f"{folder}: no *{subtype}*annotations*.json beside {found[0].name} (val needs answers)")
    try:
        by_id = {a["question_id"]: a for a in _json(anns[0])["annotations"]}
        qs = questions["questions"]
    except (KeyError, TypeError) as exc:
        raise DataError(f"{found[0]} / {anns[0]}: not the VQA layout (missing {exc})") from None
    roots = [folder / subtype, folder / "images" / subtype, folder]
    items = []
    for i, q in enumerate(qs):
        where = f"{found[0]}[questions][{i}]"
        qid = _get(q, "question_id", where)
        if qid not in by_id:
            raise DataError(f"{anns[0]}: no annotation for question_id {qid}")
        ann, image_id = by_id[qid], _get(q, "image_id", where)
        if not isinstance(image_id, int) or not isinstance(ann.get("answers"), list):
            raise DataError(f"{where}: image_id must be an integer and its annotation hold an answers list")
        image = _image(f"COCO_{subtype}_{image_id:012d}.jpg", roots, where)
        answers = _answers([a.get("answer") if isinstance(a, dict) else None for a in ann["answers"]], where)
        fields = {"answers": answers, "answer_type": ann.get("answer_type"), "question_type": ann.get("question_type")}
        items.append(Item(str(qid), build_prompt("vqav2", _get(q, "question", where), num_images=1), [image],
                          {k: v for k, v in fields.items() if v is not None}))
    return items


def _vqa_like(task: str, file: Path, sid: str, image: Callable[[dict], str], roots: list[Path]) -> list[Item]:
    items = []
    for where, rec in _records(file):
        img = _image(image(rec), roots, where)
        prompt = build_prompt(task, _get(rec, "question", where), num_images=1)
        items.append(Item(str(_get(rec, sid, where)), prompt, [img], {"answers": _answers(rec.get("answers"), where)}))
    return items


def read_textvqa(path: Path) -> list[Item]:
    file = _folder_file(path, ("TextVQA_0.5.1_val.json",), "textvqa")
    roots = [file.parent / "train_images", file.parent / "train_val_images" / "train_images", file.parent]
    return _vqa_like("textvqa", file, "question_id", lambda r: f"{r.get('image_id')}.jpg", roots)


def read_docvqa(path: Path) -> list[Item]:
    file = _folder_file(path, ("val_v1.0.json", "val_v1.0_withQT.json"), "docvqa")
    roots = [file.parent, file.parent.parent, file.parent / "spdocvqa_images", file.parent.parent / "spdocvqa_images"]
    return _vqa_like("docvqa", file, "questionId", lambda r: r.get("image"), roots)


def read_chartqa(path: Path) -> list[Item]:
    files = [path] if path.is_file() else [p for p in (path / "test_human.json", path / "test_augmented.json")
                                           if p.is_file()]
    if not files:
        raise DataError(f"{path}: holds neither test_human.json nor test_augmented.json ({LAYOUTS['chartqa']})")
    items = []
    for file in files:
        split = file.stem.removeprefix("test_") + "_test"  # lmms-lab/ChartQA's "type": human_test, augmented_test
        for i, (where, rec) in enumerate(_records(file)):
            img = _image(_get(rec, "imgname", where), [file.parent / "png", file.parent], where)
            prompt = build_prompt("chartqa", _get(rec, "query", where), num_images=1)
            fields = {"answers": _answers(rec.get("label"), where), "type": split}
            items.append(Item(f"{file.stem}/{i}", prompt, [img], fields))
    return items


def read_ocrbench(path: Path) -> list[Item]:
    file = _folder_file(path, ("OCRBench.json", "OCRBench/OCRBench.json"), "ocrbench")
    roots = [file.parent / "OCRBench_Images", file.parent, file.parent.parent / "OCRBench_Images"]
    items = []
    for i, (where, rec) in enumerate(_records(file)):
        img = _image(_get(rec, "image_path", where), roots, where)
        fields = {"answers": _answers(rec.get("answers"), where), "type": _get(rec, "type", where),
                  "dataset_name": _get(rec, "dataset_name", where)}
        items.append(Item(str(i), build_prompt("ocrbench", _get(rec, "question", where), num_images=1), [img],
                          fields))
    return items


def _rid(rec: dict, i: int, *keys: str) -> str:
    return next((str(rec[k]) for k in keys if rec.get(k) is not None), str(i))


def read_ai2d(path: Path) -> list[Item]:
    items = []
    for i, (where, rec) in enumerate(_records(path)):
        options = [str(o) for o in _get(rec, "options", where)]
        img = _image(_get(rec, "image", where), [path.parent], where)
        prompt = build_prompt("ai2d", _get(rec, "question", where), options, num_images=1)
        items.append(Item(_rid(rec, i, "id", "question_id"), prompt, [img],
                          {"answers": _answers(rec.get("answer"), where), "options": options}))
    return items


def read_realworldqa(path: Path) -> list[Item]:
    items = []
    for i, (where, rec) in enumerate(_records(path)):
        question = _get(rec, "question", where)
        img = _image(_get(rec, "image", where), [path.parent], where)
        items.append(Item(_rid(rec, i, "id", "question_id"), build_prompt("realworldqa", question, num_images=1),
                          [img], {"answers": _answers(rec.get("answer"), where), "question": question}))
    return items


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


def read_mmmu(path: Path) -> list[Item]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("validation*.json*") if p.is_file())
    if not files:
        raise DataError(f"{path}: no validation*.json or validation*.jsonl files ({LAYOUTS['mmmu']})")
    items = []
    for file in files:
        for where, rec in _records(file):
            qtype = _get(rec, "question_type", where)
            answer = _get(rec, "answer", where)
            options = rec.get("options") or "[]"
            try:
                options = ast.literal_eval(options) if isinstance(options, str) else options
            except (ValueError, SyntaxError):
                options = None
            if not isinstance(options, list):
                raise DataError(f"{where}: options must be a list (or its Python repr, as MMMU stores it)")
            answers = _literal_list(answer)
            fields: dict[str, Any] = {"answers": [str(a) for a in answers], "question_type": qtype,
                                      "subfield": rec.get("subfield")}
            kind = "open"
            if qtype == "multiple-choice":
                kind, letters = qtype, [chr(65 + i) for i in range(len(options))]
                fields.update(all_choices=letters, index2ans=dict(zip(letters, map(str, options))))
            pics = [rec[f"image_{k}"] for k in range(1, 8) if rec.get(f"image_{k}")]  # single_image: the first
            images = [_image(pics[0], [file.parent], where)] if pics else []
            question = str(_get(rec, "question", where)).strip()
            prompt = build_prompt("mmmu", question, [str(o) for o in options], kind, num_images=len(images))
            items.append(Item(str(_get(rec, "id", where)), prompt, images, fields))
    return items


def read_mathvista(path: Path) -> list[Item]:
    items = []
    for i, (where, rec) in enumerate(_records(path)):
        qtype = _get(rec, "question_type", where)
        choices = rec.get("choices")
        if qtype == "multi_choice":
            prompt = build_prompt("mathvista", _get(rec, "question", where), choices, "multi_choice", 1)
        else:
            prompt = build_prompt("mathvista", _get(rec, "query", where).replace("Hint: ", ""), None, "free_form", 1)
        img = _image(rec.get("decoded_image") or rec.get("image"), [path.parent], where)
        meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
        fields = {"answers": _answers(rec.get("answer"), where), "question_type": qtype,
                  "answer_type": _get(rec, "answer_type", where), "precision": rec.get("precision"),
                  "choices": choices, **{k: meta[k] for k in ("source", "category", "task", "context", "grade")
                                         if k in meta}}
        items.append(Item(_rid(rec, i, "pid"), prompt, [img], fields))
    return items


def _csv_rows(path: Path) -> list[list[str]]:
    rows = list(csv.reader(_text(path).splitlines()))
    for n, row in enumerate(rows, 1):
        if len(row) < 4 or row[-1].strip() not in LETTERS[: len(row) - 2]:
            raise DataError(f"{path}:{n}: expected question, options..., answer letter (got {len(row)} columns)")
    return rows


def read_mmlu(path: Path) -> list[Item]:
    root = path / "data" if (path / "data" / "test").is_dir() else path
    tests = sorted((root / "test").glob("*_test.csv"))
    if not tests:
        raise DataError(f"{root / 'test'}: no *_test.csv files ({LAYOUTS['mmlu']})")
    items = []
    for test in tests:
        subject = test.name.removesuffix("_test.csv")
        dev_file = root / "dev" / f"{subject}_dev.csv"
        if not dev_file.is_file():
            raise DataError(f"{dev_file}: missing (the 5-shot examples of {subject})")
        dev = [(r[0], r[1:-1], r[-1].strip()) for r in _csv_rows(dev_file)]
        for i, row in enumerate(_csv_rows(test)):
            prompt = build_prompt("mmlu", mmlu_prompt(subject, dev, row[0], row[1:-1]))
            fields = {"answers": [row[-1].strip()], "subject": subject, "choices": row[1:-1]}
            items.append(Item(f"{subject}/{i}", prompt, [], fields))
    return items


def read_gsm8k(path: Path) -> list[Item]:
    file = _folder_file(path, ("test.jsonl", "data/test.jsonl", "grade_school_math/data/test.jsonl"), "gsm8k")
    return [Item(str(i), build_prompt("gsm8k", _get(rec, "question", where)), [],
                 {"answers": _answers(_get(rec, "answer", where), where)})
            for i, (where, rec) in enumerate(_records(file))]


def read_math(path: Path) -> list[Item]:
    root = path / "test" if (path / "test").is_dir() else path
    items = []
    for file in sorted(root.rglob("*.json")):
        rec, where = _json(file), str(file)
        if not isinstance(rec, dict):
            raise DataError(f"{file}: expected a JSON object with problem and solution")
        fields = {"answers": [_get(rec, "solution", where)], "level": rec.get("level"), "type": rec.get("type")}
        rid = file.relative_to(root).with_suffix("").as_posix()
        items.append(Item(rid, build_prompt("math", _get(rec, "problem", where)), [], fields))
    return items


def read_humaneval(path: Path) -> list[Item]:
    items = []
    for where, rec in _records(path):
        fields = {k: _get(rec, k, where) for k in ("task_id", "prompt", "test", "entry_point")}
        items.append(Item(str(fields["task_id"]), build_prompt("humaneval", fields["prompt"]), [], fields))
    return items


def read_demo(path: Path) -> list[Item]:
    files = [path] if path.is_file() else sorted(path.glob("*.jsonl"))
    items = []
    for file in files:
        for i, (where, rec) in enumerate(_records(file)):
            turns = _get(rec, "conversations", where)
            if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, dict) for t in turns):
                raise DataError(f"{where}: conversations must hold a question and an answer turn")
            question, answer = turns[0].get("value"), turns[1].get("value")
            pics = rec.get("image") or []
            pics = [pics] if isinstance(pics, str) else pics
            images = [_image(p, [file.parent, file.parent.parent], where) for p in pics]
            if images and "<image>" not in str(question):  # as nvlm.data.formats reads LLaVA records
                question = "<image>\n" * len(images) + str(question)
            fields = {"answers": _answers(answer, where), "task": rec.get("task", file.stem)}
            items.append(Item(_rid(rec, i, "id"), build_prompt("demo", str(question)), images, fields))
    return items


READERS: dict[str, Callable[[Path], list[Item]]] = {
    "vqav2": read_vqav2, "textvqa": read_textvqa, "docvqa": read_docvqa, "chartqa": read_chartqa,
    "ocrbench": read_ocrbench, "ai2d": read_ai2d, "realworldqa": read_realworldqa, "mmmu": read_mmmu,
    "mathvista": read_mathvista, "mmlu": read_mmlu, "gsm8k": read_gsm8k, "math": read_math,
    "humaneval": read_humaneval, "demo": read_demo,
}  # fmt: skip
