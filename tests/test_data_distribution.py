"""Ranks × data workers over a blend of every source kind: disjoint, complete, exactly resumable.

Ranks are simulated in one process (streams built with rank / world_size); workers are real processes.
python -m pytest tests/test_data_distribution.py -q
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from data_fixtures import every_kind

from nvlm.data.blend import SampleStream
from nvlm.data.sources import open_mixture

N = 6  # records per source


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    old = os.environ.get("NVLM_INDEX_DIR")
    os.environ["NVLM_INDEX_DIR"] = str(root / "index")  # spawned workers inherit it
    yield every_kind(root, N)
    if old is None:
        os.environ.pop("NVLM_INDEX_DIR")
    else:
        os.environ["NVLM_INDEX_DIR"] = old


def mixture(paths):
    specs = [SimpleNamespace(path=p, name=k, weight=1.0, image_root=None) for k, p in paths.items()]
    return open_mixture(specs, seed=7)


def stream(paths, processor, rank, world, workers):
    s = SampleStream(mixture(paths), processor, 400, rank=rank, world_size=world, workers=workers, read_timeout=60)
    s.trace = []
    return s


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.input_ids == y.input_ids and x.labels == y.labels
        assert (x.pixel_values is None) == (y.pixel_values is None)
        assert x.pixel_values is None or torch.equal(x.pixel_values, y.pixel_values)


def test_two_ranks_by_two_workers_read_every_record_once_per_epoch(build_model, paths):
    processor = build_model("D")[1]
    ranks = [stream(paths, processor, r, 2, workers=2) for r in range(2)]
    try:
        for _ in range(14):
            for s in ranks:
                s.batch(12)
        assert all(len(set(s.pool.pids())) == 2 for s in ranks if s.pool)  # 4 reader processes
        reads = [t + (r,) for r, s in enumerate(ranks) for t in s.trace]
    finally:
        for s in ranks:
            s.close()
    positions = sorted(p for p, *_ in reads)
    assert positions == list(range(len(reads)))  # each position read once, none missed
    for p, _, _, worker, rank in reads:  # each reader read its own share only
        assert p % 2 == rank and (p // 2) % 2 == worker
    readers = {(rank, worker) for *_, worker, rank in reads}
    assert readers == {(0, 0), (0, 1), (1, 0), (1, 1)}
    reference = mixture(paths)
    assert all(reference.draw(p)[:2] == (name, item) for p, name, item, *_ in reads)
    by_source = defaultdict(list)
    for _, name, item, *_ in sorted(reads):
        by_source[name].append(item)
    assert len(by_source) == 8  # the seven kinds, the InternVL meta-JSON as its two entries
    for name, items in by_source.items():
        assert len(items) >= N, f"{name}: only {len(items)} reads, a whole epoch is needed"
        assert sorted(items[:N]) == list(range(N)), name  # the first epoch: every record exactly once
    assert all(s.counts["bad_sample"] == 0 for s in ranks)


def test_resume_with_workers_gives_the_batches_of_an_uninterrupted_run(build_model, paths):
    processor = build_model("D")[1]
    first = stream(paths, processor, 1, 2, workers=2)
    try:
        first.batch(5)
        state = json.loads(json.dumps(first.state_dict()))
        expected = [first.batch(5) for _ in range(2)]
        end = first.state_dict()
    finally:
        first.close()
    for workers in (2, 0):  # the number of workers does not matter either
        resumed = stream(paths, processor, 1, 2, workers=workers)
        try:
            resumed.load_state_dict(state)
            for want in expected:
                same(want, resumed.batch(5))
            assert resumed.state_dict() == end
        finally:
            resumed.close()


def test_resume_on_another_world_size_continues_past_every_rank_without_repeats(build_model, paths):
    processor = build_model("D")[1]
    old = [stream(paths, processor, r, 2, workers=0) for r in range(2)]
    for _ in range(3):
        for s in old:
            s.batch(4)
    states = [s.state_dict() for s in old]
    furthest = max(states, key=lambda st: st["blend"]["position"])  # what the trainer hands every rank
    new = [stream(paths, processor, r, 3, workers=0) for r in range(3)]
    for s in new:
        s.load_state_dict(json.loads(json.dumps(furthest)))
        s.batch(4)
    before = [p for s in old for p, *_ in s.trace]
    after = [p for s in new for p, *_ in s.trace]
    assert len(set(before + after)) == len(before) + len(after)  # no sample read twice
    assert min(after) >= furthest["blend"]["position"] > max(before)
    assert sorted(after) == list(range(min(after), min(after) + len(after)))  # the new ranks share it all
