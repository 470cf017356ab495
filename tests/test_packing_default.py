"""Packing is on by default for SFT micro-batches of several samples (issue 15); an explicit data.pack wins."""

from __future__ import annotations

from nvlm.data.packing import should_pack
from nvlm.training.config import RunConfig


def test_packing_default_rule():
    assert should_pack(None, "sft", 8)
    assert not should_pack(None, "sft", 1)  # one sample per micro-batch: nothing padded, nothing to gain
    assert not should_pack(None, "pretrain", 8)
    assert not should_pack(False, "sft", 8)
    assert should_pack(True, "pretrain", 1)


def test_data_pack_defaults_to_auto_and_takes_booleans():
    assert RunConfig.from_dict({}).data.pack is None
    assert RunConfig.from_dict({"data": {"pack": False}}).data.pack is False
