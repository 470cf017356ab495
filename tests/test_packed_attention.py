"""Attention per packed sample (``nvlm.models.packed_attention``): the loss and gradients of the dense
block-diagonal mask, and nothing changes for unpacked inputs or generation.

python -m pytest tests/test_packed_attention.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import picture, set_gates

from nvlm.data.formats import Conversation, chatml_segments
from nvlm.data.packing import collate_packed
from nvlm.models import packed_attention
from nvlm.models.packed_attention import ATTENTION, segment_lengths, use_packed_attention


def test_segment_lengths_from_restarting_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    assert segment_lengths(pos).tolist() == [0, 3, 5, 6, 10, 12]


def conversations() -> list[Conversation]:
    return [
        Conversation(
            [{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": "red and blue"}],
            [picture(150, 100, 1)],
        ),
        Conversation([{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]),
        Conversation(
            [{"role": "user", "content": "<image>\nDescribe it."}, {"role": "assistant", "content": "a red box"}],
            [picture(60, 120, 2)],
        ),
        Conversation([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]),
    ]


def loss_and_grads(model, batch, packed=False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch, return_logits=False, packed=packed)
    (out.loss_sum / out.num_tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss_sum.detach() / out.num_tokens, grads


@pytest.mark.parametrize("arch", ["D", "X"])
def test_per_sample_attention_equals_the_dense_mask(build_model, arch, monkeypatch):
    model, processor = build_model(arch)
    set_gates(model, 0.5)
    model.train()
    samples = [processor.encode_segments(chatml_segments(c), c.images) for c in conversations()]
    rows = [[samples[0], samples[1]], [samples[2], samples[3]]]  # two rows; the shorter ends in a padding tail
    batch = collate_packed(rows, 0, processor.tokens_per_tile)
    dense_loss, dense = loss_and_grads(model, batch)  # transformers' SDPA over the block-diagonal mask
    use_packed_attention(model.llm)
    assert model.llm.config._attn_implementation == ATTENTION
    calls = []  # the per-sample path really runs: one causal SDPA per packed sample and layer
    one_sample = packed_attention.causal_sdpa

    def counted(*args):
        calls.append(1)
        return one_sample(*args)

    monkeypatch.setattr(packed_attention, "causal_sdpa", counted)
    loss, grads = loss_and_grads(model, batch, packed=True)
    monkeypatch.undo()
    segments = len(segment_lengths(batch["position_ids"])) - 1
    assert segments >= 4 and len(calls) == segments * len(model.llm.get_decoder().layers)
    torch.testing.assert_close(loss, dense_loss, rtol=1e-5, atol=0)
    assert grads.keys() == dense.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(g, dense[name], rtol=1e-4, atol=1e-6, msg=name)
    # and unpacked: the padded batch of the same samples gives the same loss again
    padded = processor.collate(samples, padding_side="right")
    torch.testing.assert_close(loss_and_grads(model, padded)[0], dense_loss, rtol=1e-5, atol=0)


def test_generation_is_unchanged(build_model):
    model, processor = build_model("D")
    texts = ["<image>\nWhat color?", "Hi"]
    images = [[picture(150, 100)], []]
    batch = processor(texts, images)  # left-padded: the attention mask matters
    with torch.no_grad():
        before = model(**batch).logits
        ids_before = model.generate(processor, texts, images, max_new_tokens=5)
        use_packed_attention(model.llm)
        after = model(**batch).logits
        ids_after = model.generate(processor, texts, images, max_new_tokens=5)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert ids_after == ids_before


def test_packed_rows_build_no_dense_mask(build_model):
    """transformers builds no [rows, 1, T, T] mask for packed rows (the per-sample attention would ignore it);
    unpacked batches still get SDPA's mask."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    model, processor = build_model("D")
    samples = [processor.encode_segments(chatml_segments(c), c.images) for c in conversations()]
    packed = collate_packed([[samples[0], samples[1]], [samples[2], samples[3]]], 0, processor.tokens_per_tile)
    padded = processor.collate(samples, padding_side="right")
    use_packed_attention(model.llm)
    built = []

    def counting(*args, **kwargs):
        built.append(1)
        return sdpa_mask(*args, **kwargs)

    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, counting)
    try:
        with torch.no_grad():
            model(**packed, return_logits=False, packed=True)
            assert built == []
            model(**padded, return_logits=False)
            assert built == [1]
    finally:
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def test_packed_rows_pick_a_kernel_without_the_dense_mask():
    from nvlm.training.micro_batch import packed_attention_kind

    assert packed_attention_kind(True, "sdpa", "cpu") == "per_sample"
    assert packed_attention_kind(True, "sdpa", "cuda") == "flex_attention"  # block mask once per forward
    assert packed_attention_kind(False, "sdpa", "cuda") is None  # unpacked: SDPA with its padding mask
    assert packed_attention_kind(True, "flash_attention_2", "cuda") is None  # the user's kernel stays


@pytest.mark.parametrize("arch", ["D", "X"])
def test_flex_attention_on_packed_rows_equals_the_dense_mask(build_model, arch):
    """What a GPU run of packed rows uses (FlexAttention, eager on CPU here) = SDPA over the dense block-diagonal
    mask. Forward only: torch 2.13 has no FlexAttention backward on CPU (tests/test_gpu.py runs it on CUDA)."""
    model, processor = build_model(arch)
    set_gates(model, 0.5)
    samples = [processor.encode_segments(chatml_segments(c), c.images) for c in conversations()]
    batch = collate_packed([[samples[0], samples[1]], [samples[2], samples[3]]], 0, processor.tokens_per_tile)
    with torch.no_grad():
        dense = model(**batch, return_logits=False)
        model.llm.set_attn_implementation("flex_attention")
        flex = model(**batch, return_logits=False)
    assert flex.num_tokens == dense.num_tokens > 0
    torch.testing.assert_close(flex.loss_sum, dense.loss_sum, rtol=1e-5, atol=1e-5)


def test_packed_rows_widened_for_flex_keep_the_loss(build_model):
    """On GPU the trainer pads packed rows to a multiple of max_seq_len / 8 (FlexAttention compiles per shape):
    the added tokens are a sample of their own, so the loss is that of the narrower rows."""
    from nvlm.training.micro_batch import widen

    model, processor = build_model("X")
    set_gates(model, 0.5)
    samples = [processor.encode_segments(chatml_segments(c), c.images) for c in conversations()]
    batch = collate_packed([[samples[0], samples[1]], [samples[2], samples[3]]], 0, processor.tokens_per_tile)
    wide = widen(batch, 64, 0)
    assert wide["input_ids"].shape[1] % 64 == 0 and wide["input_ids"].shape[1] > batch["input_ids"].shape[1]
    assert widen(wide, 64, 0) is wide
    with torch.no_grad():
        narrow, padded = model(**batch, return_logits=False), model(**wide, return_logits=False)
    assert narrow.num_tokens == padded.num_tokens
    torch.testing.assert_close(padded.loss_sum, narrow.loss_sum, rtol=1e-5, atol=1e-5)
