"""Packing is on by default for SFT micro-batches of several samples; an explicit data.pack wins."""

from __future__ import annotations

import pytest
import torch
from conftest import picture

from nvlm.data.formats import Conversation, chatml_segments
from nvlm.data.packing import collate_packed, should_pack
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


def test_train_attn_names_a_kernel():
    from nvlm.config import ConfigError

    assert RunConfig.from_dict({"train": {"attn": "flex_attention"}}).train.attn == "flex_attention"
    with pytest.raises(ConfigError, match="train.attn must be one of sdpa, flash_attention_2, flex_attention"):
        RunConfig.from_dict({"train": {"attn": "flash"}})


@pytest.mark.slow
def test_packed_rows_under_flex_attention_give_the_unpacked_loss(build_model):
    """train.attn=flex_attention: transformers reads the packed samples' boundaries from the restarting position
    ids and builds a FlexAttention block mask instead of the dense [T, T] one; same loss as unpacked. (CPU runs
    FlexAttention through torch.compile, slow but real; flash_attention_2 needs a GPU and is not tested here.)"""
    model = build_model("D")
    convs = [
        Conversation(
            [{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": "red and blue"}],
            [picture(150, 100, 1)],
        ),
        Conversation([{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]),
    ]
    samples = [model.processor.encode_segments(chatml_segments(c), c.images) for c in convs]
    tpt = model.processor.tokens_per_tile
    packed_batch = collate_packed([samples], 0, tpt)
    try:
        with torch.no_grad():
            plain = model(**model.processor.collate(samples, padding_side="right"))
            model.llm.set_attn_implementation("flex_attention")
            flex = model(**packed_batch)
    finally:
        model.llm.set_attn_implementation("sdpa")
    assert flex.num_tokens == plain.num_tokens
    torch.testing.assert_close(flex.loss, plain.loss, rtol=1e-5, atol=0)
