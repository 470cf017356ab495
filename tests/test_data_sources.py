"""Record sources: every kind read by index into the same conversations, indexes built once, clear errors.

python -m pytest tests/test_data_sources.py -q
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from data_fixtures import answer, every_kind, png, write_jsonl, write_shards

from nvlm.data.formats import BadRecord, read_records
from nvlm.data.mixture import Mixture
from nvlm.data.order import EpochOrder
from nvlm.data.sources import jsonl as jsonl_module
from nvlm.data.sources import kind_of, open_sources
from nvlm.data.sources.webdataset import expand_braces
from nvlm.errors import UserError
from nvlm.vision.image_io import load_image

N = 10


@pytest.fixture(autouse=True)
def _index_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NVLM_INDEX_DIR", str(tmp_path / "index"))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_epoch_order_is_a_bijection_per_epoch(n):
    order = EpochOrder(n, "seed:source")
    for epoch in range(3):
        places = order.many(epoch, np.arange(n))
        assert sorted(places.tolist()) == list(range(n))
        assert [order(epoch, k) for k in range(0, n, max(1, n // 50))] == places[:: max(1, n // 50)].tolist()
    if n >= 64:
        assert order.many(0, np.arange(n)).tolist() != order.many(1, np.arange(n)).tolist()  # epochs differ
        assert order.many(0, np.arange(n)).tolist() != list(range(n))  # and are shuffled
    assert EpochOrder(n, "seed:source").many(0, np.arange(n)).tolist() == order.many(0, np.arange(n)).tolist()


def test_jsonl_source_reads_what_read_records_reads_and_reuses_its_index(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path, N)
    builds = []
    real = jsonl_module.line_index
    monkeypatch.setattr(jsonl_module, "line_index", lambda p: builds.append(p) or real(p))
    (source,) = open_sources(str(path))
    expected = list(read_records(path))
    assert len(source.records) == N and [source.records[i] for i in range(N)] == expected
    assert source.records[4].source == f"{path}:6"  # blank lines counted: errors name the file's line
    open_sources(str(path))
    assert len(builds) == 1  # the second open mapped the saved index
    with open(path, "a") as f:  # a changed file (size, mtime) gets a new index
        f.write(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
    (again,) = open_sources(str(path))
    assert len(builds) == 2 and len(again.records) == N + 1


def test_every_kind_maps_to_conversations(tmp_path):
    paths = every_kind(tmp_path, N)
    for kind, path in paths.items():
        sources = open_sources(path)
        assert kind_of(path) == {"llava": "parquet", "cauldron": "parquet", "finevision": "parquet"}.get(
            kind, "webdataset" if kind in ("wds", "caption") else kind
        )
        for src in sources:
            assert len(src.records) == N, kind
            for i in range(N):
                conv = src.records[i]
                name = src.name.split("/")[-1] if kind == "internvl" else {"jsonl": "conv"}.get(kind, kind)
                assert conv.messages[-1]["content"] == answer(name, i), (kind, i)
                has_image = not (kind == "llava" and i % 4 == 3)  # that parquet row is text-only
                assert len(conv.images) == int(has_image)
                assert sum(m["content"].count("<image>") for m in conv.messages) == int(has_image)
                if has_image and kind not in ("jsonl", "internvl"):
                    assert conv.images[0] == png(i) and load_image(conv.images[0]).size == (56, 56)
    meta = open_sources(paths["internvl"], weight=3.0)
    assert [s.name for s in meta] == ["meta/meta_a", "meta/meta_b"]
    assert [s.weight for s in meta] == pytest.approx([1.0, 2.0])  # records × repeat_time, scaled to 3
    assert [s.max_tiles for s in meta] == [None, 2]  # max_dynamic_patch
    (fine,) = open_sources(paths["finevision"])
    assert fine.records.layout == "finevision" and "[synthetic]" in fine.records[0].source


def test_brace_patterns_and_kind_errors(tmp_path):
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    pattern = every_kind(tmp_path, 4)["wds"].replace("00002", "00004")
    with pytest.raises(UserError, match="2 of 5 shard"):
        open_sources(pattern)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="nvlm reads: JSONL.*Parquet.*WebDataset.*InternVL"):
        open_sources(str(tmp_path / "notes.txt"))
    with pytest.raises(UserError, match="not found"):
        open_sources(str(tmp_path / "missing.jsonl"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["q"], "reply": ["a"]}), tmp_path / "odd.parquet")
    with pytest.raises(UserError, match="match no layout.*LLaVA-OneVision.*Cauldron.*FineVision"):
        open_sources(str(tmp_path / "odd.parquet"))


def test_mixture_weights_epochs_and_random_access(tmp_path):
    class Src:
        def __init__(self, name, n, weight):
            self.name, self.records, self.weight, self.max_tiles = name, list(range(n)), weight, None

    mix = Mixture([Src("a", 700, 3.0), Src("b", 50, 1.0)], seed=5)
    picks = [mix.draw(p)[:2] for p in range(10_000)]
    share = sum(name == "a" for name, _ in picks) / len(picks)
    assert 0.73 < share < 0.77
    for name, n in (("a", 700), ("b", 50)):
        items = [i for s, i in picks if s == name]
        for e in range(len(items) // n):  # every epoch of a source visits each record once
            assert sorted(items[e * n : (e + 1) * n]) == list(range(n))
    far = Mixture([Src("a", 700, 3.0), Src("b", 50, 1.0)], seed=5)
    assert [far.draw(p)[:2] for p in (9_000, 9_001, 9_999)] == [picks[9_000], picks[9_001], picks[9_999]]
    mix.position = 6_000
    state = json.loads(json.dumps(mix.state_dict()))
    resumed = Mixture([Src("a", 700, 3.0), Src("b", 50, 1.0)], seed=5)
    resumed.load_state_dict(state)
    assert [resumed.draw(p)[:2] for p in range(6_000, 6_100)] == picks[6_000:6_100]
    with pytest.raises(ValueError, match="blend changed"):
        Mixture([Src("a", 700, 3.0)], seed=5).load_state_dict(state)
    assert os.environ["NVLM_INDEX_DIR"]  # (no index touched: in-memory sources)


def test_an_energon_dataset_folder_reads_its_train_split(tmp_path):
    import shutil

    pattern = write_shards(tmp_path, 9, shards=3, caption=True)  # caption/{00000..00002}.tar: image + .txt
    folder = tmp_path / "energon"
    shutil.copytree(tmp_path / "caption", folder / "parts")
    (folder / ".nv-meta").mkdir()
    (folder / ".nv-meta" / "split.yaml").write_text(
        "split_parts:\n  train:\n    - parts/{00000..00001}.tar\n  val:\n    - parts/00002.tar\nexclude:\n"
        "  - parts/00001.tar\n"
    )
    (src,) = open_sources(str(folder))
    assert kind_of(str(folder)) == "energon" and src.records.shards == [str(folder / "parts" / "00000.tar")]
    assert [src.records[i].messages[-1]["content"] for i in range(len(src.records))] == [
        answer("caption", i) for i in range(3)
    ]
    assert len(open_sources(pattern)[0].records) == 9
    (folder / ".nv-meta" / "split.yaml").write_text("split_parts:\n  val:\n    - parts/00002.tar\n")
    with pytest.raises(UserError, match="no 'train' split part"):
        open_sources(str(folder))


def test_tar_members_read_directly_match_tarfile_and_fall_back_to_it(tmp_path):
    import io
    import tarfile

    from nvlm.data.formats import BadRecord
    from nvlm.data.sources.webdataset import plain_members, tarfile_members

    def tar_bytes(fmt, names):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for k, name in enumerate(names):
                info = tarfile.TarInfo(name)
                info.size = 700 * k + 3
                tar.addfile(info, io.BytesIO(bytes([k]) * info.size))
        return buf.getvalue()

    plain = tar_bytes(tarfile.USTAR_FORMAT, ["a/key.png", "a/key.json", "b" * 60 + "/" + "c" * 90 + ".txt"])
    assert plain_members(plain) == tarfile_members(plain, "x") and len(plain_members(plain)) == 3
    long_name = tar_bytes(tarfile.PAX_FORMAT, ["k" * 120 + ".json"])  # a pax header: tarfile reads it
    assert plain_members(long_name) is None and tarfile_members(long_name, "x")[0][0] == "k" * 120 + ".json"
    broken = bytearray(plain)
    broken[10] ^= 0xFF  # the name no longer matches the header's checksum
    assert plain_members(bytes(broken)) is None
    with pytest.raises(BadRecord, match="x: unreadable"):
        tarfile_members(bytes(broken), "x")


def test_text_only_instruction_releases_read_as_one_turn(tmp_path):
    """The text-only SFT sets' own layouts: instruction (+ input) / output, query / response, question / answer,
    problem / solution, as JSONL, a JSON list or Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"query": "2+3?", "response": "5", "type": "GSM_Rv"},
        {"question": "2+3?", "answer": "5", "system": "Be brief."},
        {"problem": "2+3?", "solution": "5"},
        {"instruction": "2+3?", "response": "5"},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pairs.json").write_text(json.dumps(rows[:1]))
    pq.write_table(pa.table({"question": ["2+3?"], "answer": ["5"], "id": ["x"]}), tmp_path / "orca.parquet")
    (jsonl,), (listed,), (parquet,) = (open_sources(str(tmp_path / n)) for n in ("pairs.jsonl", "pairs.json",
                                                                                 "orca.parquet"))  # fmt: skip
    got = [jsonl.records[i].messages for i in range(5)]
    assert got[0] == [{"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert got[1] == got[3] == got[4] == [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]
    assert got[2][0] == {"role": "system", "content": "Be brief."} and got[2][1:] == got[1]
    assert listed.records[0].messages == got[0] and parquet.records.layout == "pairs"
    assert parquet.records[0].messages == got[1] and not parquet.records[0].images
    (tmp_path / "vqa.jsonl").write_text(json.dumps({"image": "a.png", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(BadRecord, match="an instruction record with an image"):
        open_sources(str(tmp_path / "vqa.jsonl"))[0].records[0]
