"""Readers of the VQA-style benchmarks of paper Table 7 (VQAv2, TextVQA, DocVQA, ChartQA, OCRBench): each
reads the official release and the Hugging Face (lmms-lab / echo840) parquet release; ``LAYOUTS`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nvlm.eval.items import DataError, Item
from nvlm.eval.prompts import build_prompt
from nvlm.eval.sources import answers, find, get, image, load_json, rows, single

Roots = Callable[[Path], list[Path]]


def _question(task: str, rec: dict, where: str, *keys: str) -> list[dict[str, str]] | str:
    text = next((rec[k] for k in keys if rec.get(k) is not None), None)
    if not isinstance(text, str):
        raise DataError(f"{where}: missing field {keys[0]!r} (the question text)")
    return build_prompt(task, text, num_images=1)


def _has_parquet(paths: list[Path], patterns: tuple[str, ...]) -> bool:
    return all(p.suffix == ".parquet" or p.is_dir() and any(next(p.glob(g), None) for g in patterns) for p in paths)


# ---- VQAv2 ------------------------------------------------------------------------------------------------
VQAV2_HF = ("data/validation-*.parquet", "validation-*.parquet")


def read_vqav2(paths: list[Path]) -> list[Item]:
    if _has_parquet(paths, VQAV2_HF):
        items = []
        for where, rec in rows(find(paths, "vqav2", VQAV2_HF)):
            raw = get(rec, "answers", where)
            gold = answers([a.get("answer") if isinstance(a, dict) else a for a in raw], where)
            fields = {
                "answers": gold,
                "answer_type": rec.get("answer_type"),
                "question_type": rec.get("question_type"),
            }
            items.append(
                Item(
                    str(get(rec, "question_id", where)),
                    _question("vqav2", rec, where, "question"),
                    [image(get(rec, "image", where), [], where)],
                    {k: v for k, v in fields.items() if v is not None},
                )
            )
        return items
    return _vqav2_official(single(paths, "vqav2"))


def _vqav2_official(path: Path) -> list[Item]:
    folder = path if path.is_dir() else path.parent
    found = [path] if path.is_file() else sorted(folder.glob("*questions*.json"))
    if len(found) != 1:
        found = [p for p in found if "val" in p.name] or found
    if len(found) != 1:
        raise DataError(f"{path}: expected one *questions*.json, found {[p.name for p in found] or 'none'}")
    questions = load_json(found[0])
    subtype = questions.get("data_subtype", "val2014") if isinstance(questions, dict) else "val2014"
    anns = sorted(folder.glob(f"*{subtype}*annotations*.json"))
    if not anns:
        raise DataError(f"{folder}: no *{subtype}*annotations*.json beside {found[0].name} (val needs answers)")
    try:
        by_id = {a["question_id"]: a for a in load_json(anns[0])["annotations"]}
        qs = questions["questions"]
    except (KeyError, TypeError) as exc:
        raise DataError(f"{found[0]} / {anns[0]}: not the VQA layout (missing {exc})") from None
    roots = [folder / subtype, folder / "images" / subtype, folder]
    items = []
    for i, q in enumerate(qs):
        where = f"{found[0]}[questions][{i}]"
        qid = get(q, "question_id", where)
        if qid not in by_id:
            raise DataError(f"{anns[0]}: no annotation for question_id {qid}")
        ann, image_id = by_id[qid], get(q, "image_id", where)
        if not isinstance(image_id, int) or not isinstance(ann.get("answers"), list):
            raise DataError(f"{where}: image_id must be an integer and its annotation hold an answers list")
        img = image(f"COCO_{subtype}_{image_id:012d}.jpg", roots, where)
        gold = answers([a.get("answer") if isinstance(a, dict) else None for a in ann["answers"]], where)
        fields = {
            "answers": gold,
            "answer_type": ann.get("answer_type"),
            "question_type": ann.get("question_type"),
        }
        items.append(
            Item(
                str(qid),
                _question("vqav2", q, where, "question"),
                [img],
                {k: v for k, v in fields.items() if v is not None},
            )
        )
    return items


# ---- TextVQA, DocVQA: one record per question, official JSON or lmms-lab parquet ----------------------------
def _vqa_like(
    task: str, files: list[Path], sid: str, default_image: Callable[[dict], str | None], roots: Roots
) -> list[Item]:
    items = []
    for file in files:
        for where, rec in rows([file]):
            img = image(rec.get("image") or default_image(rec), roots(file), where)
            items.append(
                Item(
                    str(get(rec, sid, where)),
                    _question(task, rec, where, "question"),
                    [img],
                    {"answers": answers(rec.get("answers"), where)},
                )
            )
    return items


def read_textvqa(paths: list[Path]) -> list[Item]:
    files = find(paths, "textvqa", ("TextVQA_0.5.1_val.json", "data/validation-*.parquet", "validation-*.parquet"))

    def roots(f: Path) -> list[Path]:
        return [f.parent / "train_images", f.parent / "train_val_images" / "train_images", f.parent]

    return _vqa_like("textvqa", files, "question_id", lambda r: f"{r.get('image_id')}.jpg", roots)


def read_docvqa(paths: list[Path]) -> list[Item]:
    # today's download: spdocvqa_qas/val_v1.0_withQT.json beside a flat spdocvqa_images/ (the JSON still says
    # documents/x.png, so images are also looked up by file name); the old val.tar.gz: val/{val_v1.0.json,documents/}
    files = find(
        paths,
        "docvqa",
        (
            "val_v1.0_withQT.json",
            "spdocvqa_qas/val_v1.0_withQT.json",
            "val_v1.0.json",
            "val/val_v1.0.json",
            "DocVQA/validation-*.parquet",
            "validation-*.parquet",
            "data/validation-*.parquet",
        ),
    )

    def roots(f: Path) -> list[Path]:
        return [f.parent, f.parent.parent, f.parent / "spdocvqa_images", f.parent.parent / "spdocvqa_images"]

    return _vqa_like("docvqa", files, "questionId", lambda r: None, roots)


# ---- ChartQA ----------------------------------------------------------------------------------------------
def read_chartqa(paths: list[Path]) -> list[Item]:
    files = find(paths, "chartqa", ("test_*.json", "test/test_*.json", "data/test-*.parquet", "test-*.parquet"))
    files.sort(key=lambda f: "augmented" in f.name)  # the release's order: human, then augmented
    items: list[Item] = []
    counts: dict[str, int] = {}
    for file in files:
        for where, rec in rows([file]):
            # ids as in the official files, test_human/<n>; lmms-lab's "type" says human_test / augmented_test
            split = rec.get("type") or file.stem.removeprefix("test_") + "_test"
            n = counts[split] = counts.get(split, -1) + 1
            img = image(
                get(rec, "image", where) if "image" in rec else get(rec, "imgname", where),
                [file.parent / "png", file.parent],
                where,
            )
            label = rec.get("label") if "label" in rec else rec.get("answer")
            items.append(
                Item(
                    f"test_{split.removesuffix('_test')}/{n}",
                    _question("chartqa", rec, where, "query", "question"),
                    [img],
                    {"answers": answers(label, where), "type": split},
                )
            )
    return items


# ---- OCRBench ---------------------------------------------------------------------------------------------
OCRBENCH = (
    "OCRBench.json",
    "OCRBench/OCRBench.json",
    "json_files/OCRBench.json",
    "OCRBench/json_files/OCRBench.json",
    "data/test-*.parquet",
    "test-*.parquet",
)


def read_ocrbench(paths: list[Path]) -> list[Item]:
    items: list[Item] = []
    for file in find(paths, "ocrbench", OCRBENCH):
        ups = [file.parent, file.parent.parent, file.parent.parent.parent]  # OCRBench_Images/ beside or above
        roots = [up / "OCRBench_Images" for up in ups] + [file.parent]
        for where, rec in rows([file]):
            # official: answers, type, dataset_name, image_path; echo840/OCRBench: answer, question_type, dataset
            img = image(rec["image"] if "image" in rec else get(rec, "image_path", where), roots, where)
            gold = rec.get("answers") if "answers" in rec else rec.get("answer")
            fields = {
                "answers": answers(gold, where),
                "type": _either(rec, where, "type", "question_type"),
                "dataset_name": _either(rec, where, "dataset_name", "dataset"),
            }
            items.append(Item(str(len(items)), _question("ocrbench", rec, where, "question"), [img], fields))
    return items


def _either(rec: dict, where: str, official: str, hf: str) -> str:
    value = rec.get(official, rec.get(hf))
    if not isinstance(value, str):
        raise DataError(f"{where}: missing field {official!r} (or {hf!r})")
    return value
