"""Every benchmark read in the layouts users download (official and Hugging Face; one file, shards, a folder):
the right answers score full marks in both modes, ids are the datasets' own, images decode through the safe
loader, and bad field types are errors that name the item."""

from __future__ import annotations

import json

import pytest

from nvlm.eval.benchmarks import DataError, load_benchmark, read_benchmark
from nvlm.eval.runner import render
from nvlm.eval.scorers import score_items
from nvlm.vision.image_io import load_image

from . import layout_data as T
from . import layout_vision as L

LAYOUTS = {
    ("vqav2", "lmms-lab parquet, 2 shards"): L.vqav2_hf,
    ("textvqa", "lmms-lab parquet"): L.textvqa_hf,
    ("docvqa", "spdocvqa_qas + flat spdocvqa_images"): L.docvqa_spdocvqa,
    ("docvqa", "lmms-lab parquet, 2 shards"): L.docvqa_hf,
    ("chartqa", "lmms-lab parquet"): L.chartqa_hf,
    ("ocrbench", "repository json_files/"): L.ocrbench_repo,
    ("ocrbench", "echo840 parquet"): L.ocrbench_hf,
    ("ai2d", "lmms-lab parquet, 2 shards"): L.ai2d_hf,
    ("ai2d", "VLMEvalKit TSV"): L.ai2d_tsv,
    ("realworldqa", "parquet shards given one by one"): L.realworldqa_hf,
    ("mmmu", "MMMU/MMMU root, subject folders"): L.mmmu_hf,
    ("mathvista", "GitHub data/ with query.json"): L.mathvista_github,
    ("mathvista", "AI4Math parquet"): L.mathvista_hf,
    ("mmlu", "CSV with quoted line breaks"): T.mmlu_csv,
    ("mmlu", "cais/mmlu parquet"): T.mmlu_hf,
    ("gsm8k", "openai/gsm8k parquet"): T.gsm8k_hf,
    ("math", "MATH-500 test.jsonl"): T.math500,
    ("math", "hendrycks_math parquet"): T.math_hf,
    ("humaneval", "openai_humaneval parquet"): T.humaneval_hf,
}


@pytest.mark.parametrize("task,layout", list(LAYOUTS), ids=[f"{t}: {la}" for t, la in LAYOUTS])
def test_layout_reads_and_right_answers_score_full_marks(task, layout, tmp_path):
    data, right, ids = LAYOUTS[task, layout](tmp_path)
    bench = load_benchmark(task, data)
    assert [it.id for it in bench.items] == ids
    assert bench.files and all(f.is_file() for f in bench.files)
    for it in bench.items:
        for image in it.images:
            raw = image if isinstance(image, str) else image.load()
            assert load_image(raw).size == (64, 48)
    for mode in ("official", "nvlm"):
        records = [{"id": it.id, "prediction": p, **it.fields} for it, p in zip(bench.items, right, strict=True)]
        full = len(records) if task == "ocrbench" else 100.0
        assert score_items(task, records, mode)["score"] == pytest.approx(full), mode
        if task != "humaneval":
            wrong = [{**r, "prediction": "zzz"} for r in records]
            assert score_items(task, wrong, mode)["score"] < full


def test_mmlu_keeps_line_breaks_in_quoted_fields_in_both_releases(tmp_path):
    for build in (T.mmlu_csv, T.mmlu_hf):
        items = read_benchmark("mmlu", build(tmp_path / build.__name__)[0])
        assert T.CODE_Q + "\nA. 0 1\nB. 0\n1\nC. 1 2\nD. error\nAnswer:" in items[0].prompt
        assert items[0].fields["choices"] == ["0 1", "0\n1", "1 2", "error"]
        assert items[0].prompt.count("Answer: B") == 5  # the five dev shots, from dev-*.parquet or dev/*.csv


def test_mathvista_github_query_comes_from_query_json(tmp_path):
    items = read_benchmark("mathvista", L.mathvista_github(tmp_path)[0])
    assert "Please answer the question requiring an integer answer.\nQuestion: What is x?" in render(items[1].prompt)
    assert "Hint:" not in render(items[1].prompt)  # Megatron drops "Hint: "
    (tmp_path / "data" / "query.json").unlink()
    with pytest.raises(DataError, match=r"testmini.json\[1\]: no query .*query.json"):
        read_benchmark("mathvista", tmp_path)


def test_shards_as_folder_or_files_give_the_same_items(tmp_path):
    folder = L.ai2d_hf(tmp_path)[0]
    files = sorted((folder / "data").glob("*.parquet"))
    by_folder, by_files = load_benchmark("ai2d", folder), load_benchmark("ai2d", files)
    assert [it.id for it in by_folder.items] == [it.id for it in by_files.items]
    assert by_folder.fingerprint()["items_sha256"] == by_files.fingerprint()["items_sha256"]
    one = load_benchmark("ai2d", files[1])
    assert one.fingerprint()["items_sha256"] != load_benchmark("ai2d", files[0]).fingerprint()["items_sha256"]
    twice = read_benchmark("ai2d", [files[0], files[0].parent / ".." / "data" / files[0].name, files[1]])
    assert [it.id for it in twice] == ["0", "1", "2", "3"]  # a shard named twice is read once


@pytest.mark.parametrize(
    "change,message",
    [
        ({"options": "['root', 'leaf']"}, r"row 0\]: options must be a list .*got a string"),
        ({"options": None}, r"row 0\]: options must be a list"),
        ({"answer": "7"}, r"row 0\]: answer '7' is not an option index 0..2"),
    ],
)
def test_ai2d_field_types_are_checked_per_item(tmp_path, change, message):
    T.parquet(tmp_path / "test-00000-of-00001.parquet", [{**L.AI2D_ROWS[0], **change}])
    with pytest.raises(DataError, match=message):
        read_benchmark("ai2d", tmp_path)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"choices": None}, "choices must be a list of option texts, got None"),
        ({"answer": "B"}, "answer must be an option index 0..3, got 'B'"),
    ],
)
def test_cais_mmlu_field_types_are_checked_per_item(tmp_path, change, message):
    T.mmlu_hf(tmp_path)
    test = tmp_path / "all" / "test-00000-of-00001.parquet"
    rows = [{**r, **change} for r in json.loads(json.dumps(T.pq.read_table(test).to_pylist()))]
    T.parquet(test, rows)
    with pytest.raises(DataError, match=rf"test-00000-of-00001.parquet\[row 0\]: {message}"):
        read_benchmark("mmlu", tmp_path)


def test_unknown_layout_lists_the_layouts_we_read(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"holds none of .*lmms-lab/ai2d .*AI2D_TEST.tsv"):
        read_benchmark("ai2d", tmp_path)
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="x.parquet: not a readable parquet file"):
        read_benchmark("gsm8k", bad)
