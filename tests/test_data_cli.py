"""``nvlm data inspect / index / bench`` on small sources of every kind (no timing is asserted).

python -m pytest tests/test_data_cli.py -q
"""

from __future__ import annotations

import argparse
import json

import pytest
from data_fixtures import every_kind

from nvlm.data.cli import add_parser
from nvlm.errors import UserError


@pytest.fixture(autouse=True)
def _index_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NVLM_INDEX_DIR", str(tmp_path / "index"))


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="nvlm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *argv])
    return args.func(args)


def test_inspect_shows_layout_counts_and_a_sample_with_tiles_and_tokens(tmp_path, capsys):
    paths = every_kind(tmp_path, 5)
    assert run("inspect", *paths.values(), "--json", "--tile-size", "56", "--tokens-per-tile", "4") == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["source"] for r in report] == [
        "conv", "llava_ov", "cauldron", "finevision", "wds", "caption", "meta/meta_a", "meta/meta_b"
    ]  # fmt: skip
    by = {r["source"] + r.get("layout", ""): r for r in report}
    assert by["llava_ovllava"]["row_groups"] == 2 and by["finevisionfinevision"]["files"] == 2
    assert "relevance_ratings" in by["finevisionfinevision"]["columns"]
    assert all(r["records"] == 5 for r in report)
    for r in report:
        sample = r["sample"]
        assert sample["turns"][0].startswith("user: <image>") and sample["tokens"] > sample["image_tokens"] == 4
        assert sample["images"] == ["56x56 → 1 tile(s) (1x1)"]
    assert report[-1]["max_tiles"] == 2  # the meta-JSON's max_dynamic_patch
    assert run("inspect", paths["wds"]) == 0
    text = capsys.readouterr().out
    assert "kind webdataset" in text and "shards 3" in text and "sample000000" in text


def test_index_and_bench(tmp_path, capsys):
    paths = every_kind(tmp_path, 4)
    assert run("index", paths["wds"], paths["llava"]) == 0
    assert "4 records indexed" in capsys.readouterr().out
    bench = ("bench", paths["jsonl"], paths["caption"], "--samples", "8", "--batch", "4", "--tile-size", "32")
    assert run(*bench, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 8 and result["samples_per_s"] > 0 and result["counts"]["used"] == 12


def test_unknown_and_missing_sources_are_user_errors(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="nvlm reads"):
        run("inspect", str(tmp_path / "x.csv"))
    with pytest.raises(UserError, match="shard"):
        run("bench", str(tmp_path / "s/{0..3}.tar"))


def test_pack_writes_shards_that_read_back_as_the_same_conversations(tmp_path, capsys):
    paths = every_kind(tmp_path, 5)
    from nvlm.data.sources import open_sources
    from nvlm.vision.image_io import load_image

    for kind in ("jsonl", "llava", "finevision"):
        out = tmp_path / f"packed-{kind}"
        assert run("pack", paths[kind], str(out), "--shard-size", "3KB") == 0
        pattern = capsys.readouterr().out.strip().split(": ")[-1]
        (before,), (after,) = open_sources(paths[kind]), open_sources(pattern)
        assert len(after.records.shards) > 1 and len(after.records) == len(before.records) == 5
        for i in range(5):
            a, b = before.records[i], after.records[i]
            assert a.messages == b.messages
            assert [load_image(x).tobytes() for x in a.images] == [load_image(x).tobytes() for x in b.images]
    with pytest.raises(UserError, match="not empty"):
        run("pack", paths["jsonl"], str(tmp_path / "packed-jsonl"))
    with pytest.raises(UserError, match="--shard-size"):
        run("pack", paths["jsonl"], str(tmp_path / "x"), "--shard-size", "lots")


def test_pack_without_energon_writes_its_metadata_and_says_how_to_index(tmp_path, capsys, monkeypatch):
    import sys

    from nvlm.data.sources import open_sources

    monkeypatch.setitem(sys.modules, "megatron.energon", None)  # as if megatron-energon were not installed
    source = every_kind(tmp_path, 4)["jsonl"]
    assert run("pack", source, str(tmp_path / "packed"), "--shard-size", "3KB") == 0
    out = capsys.readouterr().out
    assert "no Energon index" in out and "energon prepare" in out
    meta = tmp_path / "packed" / ".nv-meta"
    assert json.loads((meta / ".info.json").read_text())["shard_counts"] == {"00000.tar": 2, "00001.tar": 2}
    assert "CrudeWebdataset" in (meta / "dataset.yaml").read_text()
    (packed,) = open_sources(str(tmp_path / "packed"))  # its split.yaml names the shards nvlm reads
    assert len(packed.records.shards) == 2 and packed.records[3].messages == open_sources(source)[0].records[3].messages
