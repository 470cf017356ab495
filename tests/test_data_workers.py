"""Data worker processes (``data.workers``): the same samples, order, counts and data position as without them.

python -m pytest tests/test_data_workers.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import write_color_dataset

from nvlm.data.blend import Blend, SampleStream, Source
from nvlm.data.formats import read_records


@pytest.fixture(scope="module")
def blend_parts(tmp_path_factory):
    root = write_color_dataset(tmp_path_factory.mktemp("wdata"), 12, 12)
    names = {"images": 1.0, "text": 1.0, "broken": 0.5}  # the broken image is drawn, counted and skipped
    return [(n, list(read_records(root / f"{n}.jsonl", root)), w) for n, w in names.items()]


def stream(parts, processor, workers: int, max_seq_len: int = 200) -> SampleStream:
    blend = Blend([Source(n, recs, w) for n, recs, w in parts], seed=3)
    return SampleStream(blend, processor, max_seq_len, workers=workers, read_timeout=60)


def same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.input_ids == y.input_ids and x.labels == y.labels and x.memory == y.memory
        assert (x.pixel_values is None) == (y.pixel_values is None)
        if x.pixel_values is not None:  # [tiles, 3, S, S], decoded and tiled in another process
            assert torch.equal(x.pixel_values, y.pixel_values)


def test_workers_give_the_same_batches_counts_and_position(build_model, blend_parts):
    _, processor = build_model("D")
    plain, pooled = stream(blend_parts, processor, 0), stream(blend_parts, processor, 2)
    try:
        for _ in range(3):
            same(plain.batch(5), pooled.batch(5))
            assert plain.state_dict() == pooled.state_dict()
        counts = plain.state_dict()["counts"]
        assert counts["bad_sample"] >= 1 and counts["used"] == 15  # the broken image was met and skipped
        assert counts["used_with_images"] >= 1
        assert pooled.pool is not None and len(set(pooled.pool.pids())) == 2  # encoded in 2 other processes
    finally:
        pooled.close()


def test_workers_resume_from_a_saved_position(build_model, blend_parts):
    _, processor = build_model("D")
    plain = stream(blend_parts, processor, 0)
    plain.batch(4)
    state = plain.state_dict()
    expected = plain.batch(4)
    resumed = stream(blend_parts, processor, 2)
    try:
        resumed.load_state_dict(state)
        same(expected, resumed.batch(4))
        assert resumed.state_dict() == plain.state_dict()
    finally:
        resumed.close()


def test_too_long_samples_are_degraded_alike(build_model, blend_parts):
    _, processor = build_model("D")
    plain, pooled = stream(blend_parts, processor, 0, max_seq_len=40), stream(blend_parts, processor, 2, 40)
    try:
        same(plain.batch(6), pooled.batch(6))
        assert plain.state_dict()["counts"]["degraded"] >= 1  # 3 or 7 tiles: over 40 tokens; 1 tile: 37
        assert plain.state_dict() == pooled.state_dict()
    finally:
        pooled.close()


def test_workers_config_is_checked():
    from nvlm.training.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="data.workers"):
        RunConfig.from_dict({"model": {"llm": "x", "vision": "y"}, "data": {"workers": -1}}).validate()
