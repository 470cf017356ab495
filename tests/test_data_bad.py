"""Bad data in every kind is skipped and counted, naming the file (shard) and record (key); missing files stop early.

python -m pytest tests/test_data_bad.py -q
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from data_fixtures import png, write_jsonl, write_llava_parquet, write_shards

from nvlm.data.blend import SampleStream, TooManyBadSamples
from nvlm.data.formats import BadRecord
from nvlm.data.sources import open_mixture, open_sources
from nvlm.errors import UserError


@pytest.fixture(autouse=True)
def _index_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NVLM_INDEX_DIR", str(tmp_path / "index"))


def read_all(source):
    """{record index: conversation or the BadRecord message}."""
    out = {}
    for i in range(len(source)):
        try:
            out[i] = source[i]
        except BadRecord as e:
            out[i] = str(e)
    return out


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_a_truncated_shard_keeps_its_whole_samples_and_names_the_cut_one(tmp_path):
    pattern = write_shards(tmp_path, 6, shards=2)
    last = tmp_path / "wds" / "00001.tar"
    with tarfile.open(last) as tar:
        json_member = tar.getmembers()[-1]  # sample 5's .json
    data = last.read_bytes()
    last.write_bytes(data[: json_member.offset_data + json_member.size // 2])  # cut inside it
    (src,) = open_sources(pattern)
    got = read_all(src.records)
    assert len(got) == 6 and all(not isinstance(got[i], str) for i in range(5))
    assert "00001.tar: sample sample000005: truncated" in got[5]


def test_bad_samples_in_shards_are_counted_with_shard_and_key(tmp_path, build_model):
    folder = tmp_path / "shards"
    folder.mkdir()
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]
    with tarfile.open(folder / "00000.tar", "w") as tar:
        add(tar, "good.png", png(0))
        add(tar, "good.json", json.dumps({"conversations": turns}).encode())
        add(tar, "noimage.json", json.dumps({"conversations": turns, "image": "noimage.png"}).encode())
        add(tar, "badjson.png", png(1))
        add(tar, "badjson.json", b'{"conversations": [')
        add(tar, "badpng.png", png(2)[:40])
        add(tar, "badpng.json", json.dumps({"conversations": turns}).encode())
    (src,) = open_sources(str(folder))
    got = read_all(src.records)
    assert "00000.tar: sample noimage: the record names an image but the sample has none" in got[1]
    assert "00000.tar: sample badjson: its .json does not parse" in got[2]
    spec = SimpleNamespace(path=str(folder), name="s", weight=1.0, image_root=None)
    stream = SampleStream(open_mixture([spec]), build_model("D")[1], 200, max_bad_in_row=20)
    used = [stream.next() for _ in range(3)]
    assert len(used) == 3 and stream.counts["bad_sample"] >= 3 and stream.counts["used"] == 3
    errors = "\n".join(stream.recent_errors)
    assert "sample noimage" in errors and "sample badjson" in errors and "sample badpng" in errors
    assert "00000.tar" in errors


def test_a_corrupt_row_group_is_bad_and_the_others_read(tmp_path):
    path = write_llava_parquet(tmp_path, 12, row_group=4)
    column = pq.ParquetFile(path).metadata.row_group(1).column(2)  # conversations of rows 4–7
    with open(path, "r+b") as f:
        f.seek(column.dictionary_page_offset or column.data_page_offset)
        f.write(b"\xff" * 64)  # the page header no longer parses
    (src,) = open_sources(str(path))
    got = read_all(src.records)
    bad = [i for i, v in got.items() if isinstance(v, str)]
    assert bad == [4, 5, 6, 7]
    assert "llava_ov.parquet: row group 1 does not decode" in got[4]


def test_bad_json_lines_are_counted_and_too_many_stop_the_run(tmp_path, build_model):
    path = write_jsonl(tmp_path, 4)
    with open(path, "a") as f:
        f.write("{not json\n" * 5)
    spec = SimpleNamespace(path=str(path), name="j", weight=1.0, image_root=None)
    stream = SampleStream(open_mixture([spec]), build_model("D")[1], 200, max_bad_in_row=3)
    with pytest.raises(TooManyBadSamples, match=r"conv.jsonl:\d+: not valid JSON"):
        for _ in range(40):
            stream.next()
    assert stream.counts["bad_sample"] >= 4 and stream.counts["used"] >= 1


def test_missing_shards_and_unwritable_indexes_stop_before_training(tmp_path, monkeypatch):
    pattern = write_shards(tmp_path, 4, shards=2)
    os.remove(tmp_path / "wds" / "00001.tar")
    spec = SimpleNamespace(path=pattern, name="s", weight=1.0, image_root=None)
    with pytest.raises(UserError, match=r"1 of 2 shard\(s\) missing .*00001.tar"):
        open_mixture([spec])
    (tmp_path / "wds" / "00001.tar").write_bytes(b"<html>Not Found</html>")
    with pytest.raises(UserError, match=r"00001.tar: not a readable tar shard"):
        open_mixture([spec])
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the index folder should be")
    monkeypatch.setenv("NVLM_INDEX_DIR", str(blocked))
    with pytest.raises(UserError, match="cannot save the data index.*NVLM_INDEX_DIR"):
        open_sources(str(write_jsonl(tmp_path / "j", 2)))


def test_a_source_whose_first_records_all_fail_is_refused_at_start(tmp_path):
    path = tmp_path / "wrong.jsonl"
    path.write_text("".join(json.dumps({"prompt": "q", "reply": "a"}) + "\n" for _ in range(20)))
    spec = SimpleNamespace(path=str(path), name="w", weight=1.0, image_root=None)
    with pytest.raises(UserError, match=r"wrong.jsonl:1: expected a 'conversations'.*none of the first 8 records"):
        open_mixture([spec])
    mixed = tmp_path / "mixed.jsonl"  # a good record among the first: the run starts, the bad ones are counted
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = path.read_text().splitlines(keepends=True)
    mixed.write_text("".join(bad[:3]) + json.dumps(good) + "\n" + "".join(bad[3:]))
    assert len(open_mixture([SimpleNamespace(**{**vars(spec), "path": str(mixed)})]).sources[0].records) == 21
