"""Interop with the real Megatron-Energon (the paper's loader, ``pip install 'nvlm[energon]'``; CI installs it):
a folder written by ``nvlm data pack`` opens in Energon's own loader and yields our samples, and a dataset
made by ``energon prepare`` trains with nvlm. Skipped where megatron-energon is not installed.

python -m pytest tests/test_data_energon.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from data_fixtures import write_jsonl, write_shards

from nvlm.data.cli import add_parser
from nvlm.data.formats import to_llava

energon = pytest.importorskip("megatron.energon", reason="megatron-energon is not installed (the energon extra)")


@pytest.fixture(autouse=True)
def _index_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NVLM_INDEX_DIR", str(tmp_path / "index"))


def pack(source: str, out: str) -> None:
    import argparse

    top = argparse.ArgumentParser()
    add_parser(top.add_subparsers(dest="command"))
    args = top.parse_args(["data", "pack", source, out, "--shard-size", "3KB"])
    assert args.func(args) == 0


def energon_samples(path: str) -> list[dict]:
    """Every sample of the dataset's train split through Energon's loader, as raw members (a crude dataset,
    cooked into the dict it is; no decoding)."""

    @energon.stateless
    def cook(sample: dict) -> dict:
        return sample

    class Raw(energon.DefaultTaskEncoder):
        cookers = [energon.Cooker(cook)]
        decoder = None

        def encode_sample(self, sample):
            return sample

        def batch(self, samples):
            return samples

    worker = energon.WorkerConfig(rank=0, world_size=1, num_workers=0)
    dataset = energon.get_train_dataset(
        path,
        batch_size=1,
        shuffle_buffer_size=None,
        max_samples_per_sequence=None,
        worker_config=worker,
        task_encoder=Raw(),
        repeat=False,
    )
    return [sample for batch in energon.get_loader(dataset) for sample in batch]


def test_a_packed_folder_opens_in_energons_loader_with_our_samples(tmp_path):
    from nvlm.data.sources import open_sources

    source = write_jsonl(tmp_path / "src", 5)
    out = tmp_path / "packed"
    pack(str(source), str(out))
    assert (out / ".nv-meta" / "index.sqlite").is_file() and (out / "00000.tar.idx").is_file()  # Energon's index
    (ours,) = open_sources(str(source))
    got = sorted(energon_samples(str(out)), key=lambda s: s["__key__"])
    assert [s["__key__"] for s in got] == [f"{i:09d}" for i in range(5)]
    for i, sample in enumerate(got):
        record = ours.records[i]
        assert json.loads(sample["json"]) == to_llava(type(record)(record.messages, []))
        assert sample["00.png"] == open(record.images[0], "rb").read()  # the image bytes as stored
    (back,) = open_sources(str(out))  # and nvlm reads the folder as an Energon dataset
    assert back.records.kind == "webdataset" and len(back.records) == 5
    assert back.records[3].messages == ours.records[3].messages


def test_a_dataset_made_by_energon_prepare_trains(backbones, tmp_path):
    from nvlm.training.config import RunConfig
    from nvlm.training.trainer import Trainer

    folder = os.path.dirname(write_shards(tmp_path, 6, shards=2, caption=True))  # png + txt captions
    cmd = [sys.executable, "-m", "megatron.energon.cli.main", "prepare", folder, "--non-interactive",
           "--split-ratio", "1,0,0", "--sample-type", "CaptioningSample",
           "--field-map", '{"image": "png", "caption": "txt"}']  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.isfile(os.path.join(folder, ".nv-meta", "split.yaml"))
    cfg = RunConfig.from_dict({
        "model": {"arch": "D", "llm": str(backbones["qwen2"]), "vision": str(backbones["internvl"])},
        "data": {"sources": [{"path": folder}], "max_seq_len": 512},
        "train": {"max_steps": 2, "global_batch_size": 2, "micro_batch_size": 2, "lr": 1e-3,
                  "min_lr": 1e-4}})  # fmt: skip
    result = Trainer(cfg, tmp_path / "run", log=lambda *a, **k: None).run()
    assert result.steps == 2 and not result.interrupted
    assert result.counts["used_with_images"] == 4 and result.counts.get("bad_sample", 0) == 0
