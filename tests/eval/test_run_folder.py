"""A run folder never mixes datasets: ``run.json`` records a fingerprint of the data, and a run with other data
(another shard, another release) is refused with exit 2 unless ``--restart``. End to end with a tiny model on
AI2D's parquet shards."""

from __future__ import annotations

import json

import pytest
from conftest import save_pair

from nvlm.cli import main
from nvlm.eval.scorers import score_items
from nvlm.models.nvlm import NVLM

from . import layout_vision as L


@pytest.fixture(scope="module")
def ckpt(build_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("run_folder") / "ckpt"
    save_pair(build_model("D"), str(path))
    return path


@pytest.fixture
def generated(monkeypatch):
    """How many items reached NVLM.generate (which still runs)."""
    count, real = [0], NVLM.generate

    def spy(self, processor, prompts, *args, **kwargs):
        count[0] += len(prompts)
        return real(self, processor, prompts, *args, **kwargs)

    monkeypatch.setattr(NVLM, "generate", spy)
    return count


def run(ckpt, data, out, *extra) -> int:
    paths = [str(d) for d in (data if isinstance(data, list) else [data])]
    return main(
        [
            "eval",
            "run",
            "--model",
            str(ckpt),
            "--task",
            "ai2d",
            "--data",
            *paths,
            "--out",
            str(out),
            "--max-new-tokens",
            "2",
            *extra,
        ]
    )


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "ai2d" / "predictions.jsonl").read_text().splitlines()]


def test_another_shard_is_refused_until_restart(ckpt, tmp_path, generated, capsys):
    folder = L.ai2d_hf(tmp_path / "ai2d")[0]
    first, second = sorted((folder / "data").glob("*.parquet"))
    out = tmp_path / "evals"
    assert run(ckpt, first, out) == 0 and generated[0] == 2
    before = (out / "ai2d" / "predictions.jsonl").read_bytes()
    capsys.readouterr()
    assert run(ckpt, second, out) == 2  # same ids "0", "1": would score shard 1's answers against shard 2's
    err = capsys.readouterr().err
    assert "was made from other data (2 items from" in err and str(first.resolve()) in err
    assert str(second.resolve()) in err and "--restart" in err
    assert (out / "ai2d" / "predictions.jsonl").read_bytes() == before and generated[0] == 2
    assert run(ckpt, second, out, "--restart") == 0 and generated[0] == 4
    recs = records(out)
    assert [r["answers"] for r in recs] == [["C"], ["A"]]  # shard 2's answers (options index 2, 0)
    summary = json.loads((out / "ai2d" / "summary.json").read_text())
    assert summary["n"] == 2 and summary["score"] == pytest.approx(score_items("ai2d", recs)["score"])


def test_shards_then_folder_resume_the_same_run(ckpt, tmp_path, generated, capsys):
    folder = L.ai2d_hf(tmp_path / "ai2d")[0]
    shards = sorted((folder / "data").glob("*.parquet"))
    out = tmp_path / "evals"
    assert run(ckpt, shards, out, "--limit", "3") == 0 and generated[0] == 3
    assert run(ckpt, folder, out) == 0 and generated[0] == 4  # the same data: only the 4th item is new
    assert "reused from an earlier run: 3" in capsys.readouterr().out
    assert [r["id"] for r in records(out)] == ["0", "1", "2", "3"]
    assert json.loads((out / "ai2d" / "run.json").read_text())["data"]["items"] == 4


@pytest.mark.parametrize("settings", [None, {"task": "ai2d", "data": "/old/test.jsonl"}])
def test_a_folder_that_cannot_say_its_data_is_refused(ckpt, tmp_path, generated, capsys, settings):
    folder = L.ai2d_hf(tmp_path / "ai2d")[0]
    out = tmp_path / "evals" / "ai2d"
    out.mkdir(parents=True)
    (out / "predictions.jsonl").write_text(json.dumps({"id": "0", "prediction": "A"}) + "\n")
    if settings is not None:  # written before run folders recorded their data
        (out / "run.json").write_text(json.dumps(settings))
    assert run(ckpt, folder, tmp_path / "evals") == 2
    assert "--restart" in capsys.readouterr().err and generated[0] == 0
