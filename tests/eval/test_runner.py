"""``nvlm eval run``: readers of the public layouts, pinned prompts, batched generation, MMLU log-probs, resume,
and errors that name the file. A tiny random model answers; scores are checked against ``score_items``."""

from __future__ import annotations

import base64
import csv
import gzip
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import save_pair
from PIL import Image

import nvlm
from nvlm.cli import main
from nvlm.eval.benchmarks import PROMPTS, DataError, EncodedImage, read_benchmark
from nvlm.eval.runner import LocalModel, letter_logprobs, render, run_benchmark
from nvlm.eval.scorers import score_items
from nvlm.eval.scorers.mmlu import mmlu_prompt
from nvlm.models.nvlm import NVLM

FOLLOW = "Follow the user's instruction and answer questions."
CHOICE = "Answer with the option's letter from the given choices directly."


def chatml(system: str | None, user: str) -> str:
    sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{sys_part}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def png(path: Path | None = None, size=(64, 48), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def ckpt(build_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("runner") / "ckpt"
    save_pair(build_model("D"), str(path))
    return path


@pytest.fixture
def calls(monkeypatch):
    """Every (prompts, images) that reaches NVLM.generate, which still runs."""
    seen: list[tuple[list[str], list[list]]] = []
    real = NVLM.generate

    def spy(self, processor, prompts, images=None, **kwargs):
        seen.append((list(prompts), [list(i) for i in images]))
        return real(self, processor, prompts, images, **kwargs)

    monkeypatch.setattr(NVLM, "generate", spy)
    return seen


def run(ckpt, task, data, out, *extra) -> int:
    return main(
        [
            "eval",
            "run",
            "--model",
            str(ckpt),
            "--task",
            task,
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-new-tokens",
            "3",
            *extra,
        ]
    )


# ---- fixture data in the public layouts -------------------------------------------------------------------------
def textvqa_data(root: Path) -> Path:
    png(root / "train_images" / "a1.jpg", (64, 48))
    png(root / "train_images" / "b2.jpg", (40, 60), (0, 90, 200))
    data = [
        {"question_id": 34602, "image_id": "a1", "question": "what brand is shown?", "answers": ["nokia"] * 10},
        {
            "question_id": 34603,
            "image_id": "b2",
            "question": "what number is it?",
            "answers": ["12"] * 6 + ["twelve"] * 4,
        },
        {"question_id": 34604, "image_id": "a1", "question": "what color?", "answers": ["red"] * 10},
    ]
    path = root / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}))
    return path


def gsm8k_data(root: Path) -> Path:
    return jsonl(
        root / "test.jsonl",
        [
            {"question": "Ann has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
            {"question": "What is 6 times 12?", "answer": "6*12=72\n#### 72"},
            {"question": "Tom had 10 pens and lost 1,000 of 1,001. Left?", "answer": "#### 1"},
        ],
    )


def mmlu_data(root: Path) -> Path:
    data = root / "data"
    for split, rows in (
        ("dev", [[f"What is {i}+1?", i, i + 1, i + 2, i + 3, "B"] for i in range(5)]),
        (
            "test",
            [
                ["Which is prime?", 4, 6, 7, 8, "C"],
                ["Which is even?", 2, 3, 5, 7, "A"],
                ["Pick D.", "a", "b", "c", "d", "D"],
            ],
        ),
    ):
        (data / split).mkdir(parents=True)
        with open(data / split / f"abstract_algebra_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return data


# ---- end to end through the CLI ---------------------------------------------------------------------------------
def test_textvqa_end_to_end_prompts_images_and_score(ckpt, tmp_path, calls):
    data = textvqa_data(tmp_path / "textvqa")
    out = tmp_path / "evals"
    assert run(ckpt, "textvqa", data, out, "--batch-size", "2") == 0
    preds = out / "textvqa" / "predictions.jsonl"
    records = lines(preds)
    assert [r["id"] for r in records] == ["34602", "34603", "34604"]
    assert [len(p) for p, _ in calls] == [2, 1]  # batches of 2
    suffix = "\nAnswer the question using a single word, phrase, or number."
    assert calls[0][0][1] == chatml(FOLLOW, "<image>\nwhat number is it?" + suffix)
    assert [[im.size for im in ims] for ims in calls[0][1]] == [[(64, 48)], [(40, 60)]]
    summary = json.loads((out / "textvqa" / "summary.json").read_text())
    assert summary["n"] == 3 and summary["mode"] == "official"
    assert summary["score"] == pytest.approx(score_items("textvqa", records)["score"])
    # a model that got item 34603 right: scoring reads the predictions back, nothing is generated again
    records[1]["prediction"] = "Twelve"
    preds.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run(ckpt, "textvqa", data, out, "--mode", "nvlm") == 0
    assert len(calls) == 2
    summary = json.loads((out / "textvqa" / "summary.json").read_text())
    assert summary["mode"] == "nvlm"
    assert summary["score"] == pytest.approx(score_items("textvqa", records, "nvlm")["score"]) == 100 / 3 * 1.0


def test_gsm8k_end_to_end(ckpt, tmp_path, calls):
    out = tmp_path / "evals"
    assert run(ckpt, "gsm8k", gsm8k_data(tmp_path), out) == 0
    records = lines(out / "gsm8k" / "predictions.jsonl")
    assert [r["id"] for r in records] == ["0", "1", "2"]
    assert records[1]["answers"] == ["6*12=72\n#### 72"]
    assert calls[0][0][1] == chatml(
        None,
        "What is 6 times 12?\nSolve the problem step by step. Write the final "
        'answer on the last line in the form "#### <number>".',
    )
    assert calls[0][1] == [[], [], []]
    summary = json.loads((out / "gsm8k" / "summary.json").read_text())
    assert summary["n"] == 3 and summary["score"] == score_items("gsm8k", records)["score"]


def test_mmlu_letters_by_log_probability(ckpt, tmp_path, calls):
    data = mmlu_data(tmp_path)
    out = tmp_path / "evals"
    assert run(ckpt, "mmlu", data, out) == 0
    assert calls == []  # no generation: the log-prob path
    records = lines(out / "mmlu" / "predictions.jsonl")
    assert [r["id"] for r in records] == ["abstract_algebra/0", "abstract_algebra/1", "abstract_algebra/2"]
    for r in records:
        assert set(r["logprobs"]) == set("ABCD")
        assert r["prediction"] == max("ABCD", key=lambda k: r["logprobs"][k])
    summary = json.loads((out / "mmlu" / "summary.json").read_text())
    again = score_items("mmlu", records)
    assert summary["score"] == pytest.approx(again["score"]) and summary["scored_by_logprobs"] == 3
    # the stored log-probabilities are those of " B" etc. after the official prompt, one sequence at a time
    model, processor = nvlm.load(ckpt)
    dev = [(f"What is {i}+1?", [str(i), str(i + 1), str(i + 2), str(i + 3)], "B") for i in range(5)]
    prompt = mmlu_prompt("abstract_algebra", dev, "Which is even?", ["2", "3", "5", "7"])
    assert prompt.startswith("The following are multiple choice questions (with answers) about  abstract algebra.")
    for letter in "AB":
        assert records[1]["logprobs"][letter] == pytest.approx(
            _continuation_logprob(model, processor, prompt, letter), abs=1e-3
        )


def _continuation_logprob(model, processor, prompt: str, letter: str) -> float:
    tok = processor.tokenizer
    cont = tok(prompt + " " + letter)["input_ids"][len(tok(prompt)["input_ids"]) :]
    ids = torch.tensor([tok(prompt + " " + letter)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    n = ids.shape[1]
    return float(sum(logp[n - len(cont) - 1 + j, cont[j]] for j in range(len(cont))))


def test_letter_logprobs_one_token_and_continuation_paths_agree(build_model):
    model, processor = build_model("D")
    prompts = ["Question one?\nA. x\nB. y\nAnswer:", "Another, longer question here?\nA. p\nB. q\nAnswer:"]
    tok = processor.tokenizer
    assert len(tok(" A", add_special_tokens=False)["input_ids"]) == 1  # one forward pass over the prompts
    assert len(tok(" B", add_special_tokens=False)["input_ids"]) == 2  # scored as a continuation
    local = LocalModel(model, processor)
    fast = letter_logprobs(local, prompts, ["A", "A"])
    slow = letter_logprobs(local, prompts, ["AB", "AB"])
    for i, prompt in enumerate(prompts):
        assert fast[i]["A"] == pytest.approx(_continuation_logprob(model, processor, prompt, "A"), abs=1e-4)
        assert slow[i]["A"] == pytest.approx(fast[i]["A"], abs=1e-4)
        assert slow[i]["B"] == pytest.approx(_continuation_logprob(model, processor, prompt, "B"), abs=1e-4)


def test_demo_end_to_end(ckpt, tmp_path, calls):
    from nvlm.data.formats import read_records
    from nvlm.demo import synthetic

    synthetic.generate(tmp_path / "demo", 1, 2, tasks=["color"], n_text_scene=0)
    test = tmp_path / "demo" / "test"
    out = tmp_path / "evals"
    assert run(ckpt, "demo", test, out, "--batch-size", "50") == 0  # the folder: color and add
    records = lines(out / "demo" / "predictions.jsonl")
    convs = list(read_records(test / "add.jsonl", tmp_path / "demo")) + list(
        read_records(test / "color.jsonl", tmp_path / "demo")
    )
    assert len(records) == len(convs) == 22
    assert calls[0][0] == [render(c.messages[:-1]) for c in convs]  # the demo's own evaluation prompts
    scores = [synthetic.score(r["task"], r["prediction"], r["answers"][0]) for r in records]
    summary = json.loads((out / "demo" / "summary.json").read_text())
    assert summary["score"] == pytest.approx(100 * sum(scores) / len(scores))
    assert summary["by_task"]["color"]["n"] == 2 and summary["by_task"]["add"]["n"] == 20
    records[-1]["prediction"] = f" {records[-1]['answers'][0].upper()}."  # right after the demo's normalisation
    (out / "demo" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run(ckpt, "demo", test, out) == 0 and len(calls) == 1
    summary = json.loads((out / "demo" / "summary.json").read_text())
    assert summary["by_task"]["color"]["score"] == pytest.approx(100 * (int(scores[-2]) + 1) / 2)


# ---- resume, settings, errors ----------------------------------------------------------------------------------
def test_resume_skips_done_items_and_repairs_a_torn_line(ckpt, tmp_path, calls, capsys):
    data = gsm8k_data(tmp_path)
    out = tmp_path / "evals"
    preds = out / "gsm8k" / "predictions.jsonl"
    assert run(ckpt, "gsm8k", data, out, "--limit", "2") == 0
    assert sum(len(p) for p, _ in calls) == 2 and len(lines(preds)) == 2
    assert json.loads((out / "gsm8k" / "summary.json").read_text())["n"] == 2
    first = preds.read_bytes()
    with open(preds, "ab") as f:
        f.write(b'{"id": "2", "predic')  # killed while writing the third answer
    assert run(ckpt, "gsm8k", data, out) == 0
    assert sum(len(p) for p, _ in calls) == 3 and "What is 6 times" not in "".join(calls[-1][0])
    assert preds.read_bytes().startswith(first)
    assert [r["id"] for r in lines(preds)] == ["0", "1", "2"]
    assert json.loads((out / "gsm8k" / "summary.json").read_text())["n"] == 3
    assert run(ckpt, "gsm8k", data, out) == 0 and sum(len(p) for p, _ in calls) == 3
    capsys.readouterr()
    assert run(ckpt, "gsm8k", data, out, "--max-new-tokens", "5") == 2  # other settings: refused
    assert "max_new_tokens" in capsys.readouterr().err


def test_run_benchmark_api_flushes_every_batch(build_model, tmp_path, monkeypatch):
    model, data, out = build_model("D"), gsm8k_data(tmp_path), tmp_path / "out"
    preds = out / "gsm8k" / "predictions.jsonl"
    on_disk, real = [], NVLM.generate

    def spy(self, *args, **kwargs):  # what a crash at this moment would leave behind
        on_disk.append(len(preds.read_text().splitlines()))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(NVLM, "generate", spy)
    res = run_benchmark(model, "gsm8k", data, out, limit=1, max_new_tokens=2, progress=False)
    assert (res["n"], res["generated"], res["reused"]) == (1, 1, 0)
    res = run_benchmark(model, "gsm8k", data, out, batch_size=1, max_new_tokens=2, progress=False)
    assert (res["n"], res["generated"], res["reused"]) == (3, 2, 1)
    assert on_disk == [0, 1, 2] and Path(res["summary"]).is_file()


def test_bad_data_exit_2_naming_the_file(ckpt, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "test.jsonl"
    assert run(ckpt, "gsm8k", missing, tmp_path / "o") == 2
    assert str(missing) in capsys.readouterr().err
    bad = tmp_path / "gsm" / "test.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    assert run(ckpt, "gsm8k", bad, tmp_path / "o") == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    data = textvqa_data(tmp_path / "tv")
    (data.parent / "train_images" / "b2.jpg").unlink()
    assert run(ckpt, "textvqa", data, tmp_path / "o") == 2
    assert "'b2.jpg' not found" in capsys.readouterr().err
    (mmlu_data(tmp_path / "m") / "dev" / "abstract_algebra_dev.csv").unlink()
    assert run(ckpt, "mmlu", tmp_path / "m", tmp_path / "o") == 2
    assert "abstract_algebra_dev.csv: missing" in capsys.readouterr().err
    assert run(tmp_path / "no-model", "gsm8k", gsm8k_data(tmp_path / "g"), tmp_path / "o") == 2
    assert "no-model" in capsys.readouterr().err


# ---- the other readers, without a model: public layout -> prompt, images and fields the scorer takes -----------
def _vqav2(root):
    png(root / "val2014" / "COCO_val2014_000000000042.jpg")
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps(
            {
                "data_subtype": "val2014",
                "questions": [{"image_id": 42, "question": "What color?", "question_id": 42000}],
            }
        )
    )
    (root / "v2_mscoco_val2014_annotations.json").write_text(
        json.dumps(
            {
                "annotations": [
                    {
                        "question_id": 42000,
                        "image_id": 42,
                        "answer_type": "other",
                        "question_type": "what color",
                        "answers": [{"answer": "red", "answer_id": k} for k in range(1, 11)],
                    }
                ]
            }
        )
    )
    return root, ["red"], "What color?\nAnswer the question using a single word or phrase."


def _docvqa(root):
    png(root / "documents" / "pybv0228_81.png")
    (root / "val_v1.0.json").write_text(
        json.dumps(
            {
                "dataset_split": "val",
                "data": [
                    {
                        "questionId": 49153,
                        "question": "What is the date?",
                        "image": "documents/pybv0228_81.png",
                        "answers": ["1/2/2005", "01/02/2005"],
                    }
                ],
            }
        )
    )
    return (
        root / "val_v1.0.json",
        ["1/2/2005"],
        ("What is the date?\nAnswer the question using a single word, phrase, or number."),
    )


def _chartqa(root):
    png(root / "png" / "a.png")
    png(root / "png" / "b.png")
    (root / "test_human.json").write_text(json.dumps([{"imgname": "a.png", "query": "Max?", "label": "12"}]))
    (root / "test_augmented.json").write_text(json.dumps([{"imgname": "b.png", "query": "Up?", "label": "Yes"}]))
    return root, ["12.3", "yes"], "Max?\nAnswer the question using a single word or phrase."


def _ocrbench(root):
    png(root / "OCRBench_Images" / "IIIT5K" / "test" / "1.png")
    png(root / "OCRBench_Images" / "HME100k" / "2.png")
    (root / "OCRBench.json").write_text(
        json.dumps(
            [
                {
                    "dataset_name": "IIIT5K",
                    "id": 2843,
                    "image_path": "IIIT5K/test/1.png",
                    "question": "what is written in the image?",
                    "answers": "CENTRE",
                    "type": "Regular Text Recognition",
                },
                {
                    "dataset_name": "HME100k",
                    "id": 7,
                    "image_path": "HME100k/2.png",
                    "question": "Write the LaTeX.",
                    "answers": ["x^{2}+1"],
                    "type": "Handwritten Mathematical Expression Recognition",
                },
            ]
        )
    )
    return root, ["It says centre", "x ^ {2} + 1"], "what is written in the image?"


def _ai2d(root):
    rows = [
        {
            "question": "Which part is the leaf?",
            "options": ["root", "leaf", "stem", "flower"],
            "answer": "1",
            "image": {"bytes": b64(png()), "path": None},
        }
    ]
    return (
        jsonl(root / "ai2d_test.jsonl", rows),
        ["B"],
        ("Which part is the leaf?\nA. root\nB. leaf\nC. stem\nD. flower\n" + CHOICE),
    )


def _realworldqa(root):
    png(root / "images" / "0.png")
    q = "How many cars?\nA. 1\nB. 2\nC. 3\nPlease answer directly with only the letter of the correct option."
    (root / "rwqa.json").write_text(json.dumps([{"image": "images/0.png", "question": q, "answer": "B"}]))
    return root / "rwqa.json", ["B"], q


def _mmmu(root):
    jsonl(
        root / "Art" / "validation-00000-of-00001.jsonl",
        [
            {
                "id": "validation_Art_1",
                "question": "<image 1> Which painting style?",
                "options": "['Cubism', 'Baroque']",
                "answer": "B",
                "question_type": "multiple-choice",
                "image_1": {"bytes": b64(png()), "path": None},
                "image_2": None,
                "subfield": "Art History",
            },
            {
                "id": "validation_Art_2",
                "question": "How many figures are in <image 1>?",
                "options": "[]",
                "answer": "['3', 'three']",
                "question_type": "open",
                "image_1": {"bytes": b64(png())},
            },
        ],
    )
    jsonl(root / "Art" / "dev-00000-of-00001.jsonl", [{"id": "dev_Art_1"}])  # not validation: ignored
    return root, ["B", "three"], ("Which painting style?\n(A) Cubism\n(B) Baroque\n\n" + CHOICE)


def _mathvista(root):
    png(root / "images" / "2.jpg")
    data = {
        "1": {
            "pid": "1",
            "question": "Which is bigger?",
            "choices": ["3", "4", "5"],
            "answer": "4",
            "question_type": "multi_choice",
            "answer_type": "text",
            "precision": None,
            "query": "unused",
            "decoded_image": {"bytes": b64(png())},
            "metadata": {"source": "FunctionQA", "grade": "college"},
        },
        "2": {
            "pid": "2",
            "question": "What is x?",
            "query": "Hint: Answer with an integer.\nQuestion: What is x?",
            "answer": "14",
            "question_type": "free_form",
            "answer_type": "integer",
            "precision": None,
            "choices": None,
            "image": "images/2.jpg",
        },
    }
    (root / "testmini.json").write_text(json.dumps(data))
    return root / "testmini.json", ["B", "14"], "Which is bigger?\nA. 3\nB. 4\nC. 5\n" + CHOICE


def _math(root):
    path = root / "MATH" / "test" / "algebra" / "1.json"
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps(
            {
                "problem": "Half of one?",
                "level": "Level 1",
                "type": "Algebra",
                "solution": "It is $\\boxed{\\frac{1}{2}}$.",
            }
        )
    )
    return root / "MATH", ["So $\\boxed{\\frac12}$"], "Half of one?\nPlease reason step by step"


def _humaneval(root):
    prompt = 'def add(a, b):\n    """Add."""\n'
    row = {
        "task_id": "HumanEval/0",
        "prompt": prompt,
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
        "entry_point": "add",
    }
    (root / "HumanEval.jsonl.gz").write_bytes(gzip.compress((json.dumps(row) + "\n").encode()))
    return root / "HumanEval.jsonl.gz", ["    return a + b\n"], prompt


READERS = {
    "vqav2": _vqav2,
    "docvqa": _docvqa,
    "chartqa": _chartqa,
    "ocrbench": _ocrbench,
    "ai2d": _ai2d,
    "realworldqa": _realworldqa,
    "mmmu": _mmmu,
    "mathvista": _mathvista,
    "math": _math,
    "humaneval": _humaneval,
}


@pytest.mark.parametrize("task", list(READERS))
def test_reader_public_layout_gives_scorable_items(task, tmp_path):
    data, right_answers, prompt_text = READERS[task](tmp_path)
    items = read_benchmark(task, data)
    assert len(items) == len(right_answers)
    first = render(items[0].prompt)
    assert prompt_text in first
    if task in ("humaneval",):
        assert first == prompt_text  # completed as it is, no ChatML
    else:
        assert first.startswith("<|im_start|>") and first.endswith("<|im_start|>assistant\n")
        assert f"<image>\n{prompt_text}" in first or task == "math"
    for it in items:
        for image in it.images:
            raw = image.load() if isinstance(image, EncodedImage) else Path(image).read_bytes()
            assert Image.open(io.BytesIO(raw)).size == (64, 48)
    records = [{"id": it.id, "prediction": p, **it.fields} for it, p in zip(items, right_answers)]
    expect = len(items) if task == "ocrbench" else 100.0
    for mode in ("official", "nvlm"):
        assert score_items(task, records, mode)["score"] == pytest.approx(expect), mode
        if task != "humaneval":
            wrong = [{**r, "prediction": "zzz"} for r in records]
            assert score_items(task, wrong, mode)["score"] < expect


def test_mmmu_reader_follows_megatron_single_image_prompt(tmp_path):
    items = read_benchmark("mmmu", _mmmu(tmp_path)[0])
    assert [it.id for it in items] == ["validation_Art_1", "validation_Art_2"]
    assert render(items[1].prompt) == chatml(
        "Answer the questions.",
        "<image>\nHow many figures are in the image?\nAnswer the question using a single word or phrase.",
    )
    assert items[0].fields["index2ans"] == {"A": "Cubism", "B": "Baroque"}
    assert items[1].fields["answers"] == ["3", "three"]


def test_readers_name_the_file_on_bad_data(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        read_benchmark("docvqa", tmp_path / "val_v1.0.json")
    (tmp_path / "OCRBench.json").write_text(json.dumps([{"dataset_name": "x", "image_path": "a.png"}]))
    with pytest.raises(DataError, match=r"OCRBench.json\[0\]: image 'a.png' not found"):
        read_benchmark("ocrbench", tmp_path)
    jsonl(tmp_path / "dup.jsonl", [{"task_id": "T/0", "prompt": "p", "test": "t", "entry_point": "f"}] * 2)
    with pytest.raises(DataError, match="'T/0' occurs twice"):
        read_benchmark("humaneval", tmp_path / "dup.jsonl")


def test_readme_prints_the_pinned_prompts():
    readme = (Path(__file__).resolve().parents[2] / "nvlm" / "eval" / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Pinned prompts", 1)[1]
    for task, spec in PROMPTS.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{task}` | "))
        assert (f"| `{spec.system}` |" if spec.system else f"| `{task}` | — |") in row, task
        for template in spec.user.values():
            shown = template.format(question="{question}", options="{options}").replace("\n", "\\n")
            assert f"`{shown}`" in row, (task, shown)
        assert f"| {spec.max_new_tokens} " in row, task
