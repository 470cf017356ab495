"""The preallocated KV cache (``nvlm.inference.kv_cache``) holds exactly what transformers' DynamicLayer holds,
writes in place while there is room, and survives the cache operations that replace its tensors.

python -m pytest tests/test_kv_cache.py -q
"""

from __future__ import annotations

import torch
from conftest import picture, set_gates
from transformers.cache_utils import DynamicLayer

from nvlm.data.chat import chat_prompt
from nvlm.inference.generate import generate_ids
from nvlm.inference.kv_cache import GrowingLayer, preallocated_cache


def _kv(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, t, 8, generator=g), torch.randn(b, 2, t, 8, generator=g)


def test_growing_layer_equals_dynamic_layer_and_writes_in_place():
    grow, dyn = GrowingLayer(capacity=12), DynamicLayer()
    for step, t in enumerate([5, 1, 1, 3, 1]):
        k, v = _kv(3, t, step)
        (gk, gv), (dk, dv) = grow.update(k, v), dyn.update(k, v)
        assert torch.equal(gk, dk) and torch.equal(gv, dv)
    assert grow.get_seq_length() == dyn.get_seq_length() == 11
    buffer = grow._k
    grow.update(*_kv(3, 1, 9))  # the 12th position still fits: same buffer, no copy
    assert grow._k is buffer and grow.keys.data_ptr() == buffer.data_ptr()


def test_growing_layer_doubles_past_its_capacity_and_keeps_the_values():
    grow, dyn = GrowingLayer(capacity=4), DynamicLayer()
    for step in range(9):
        k, v = _kv(2, 1 if step else 4, step)
        grow.update(k, v)
        dyn.update(k, v)
    assert grow._k.shape[2] == 16  # 4 → 8 → 16
    assert torch.equal(grow.keys, dyn.keys) and torch.equal(grow.values, dyn.values)


def test_growing_layer_after_crop_and_row_selection():
    grow, dyn = GrowingLayer(capacity=32), DynamicLayer()
    for layer in (grow, dyn):
        layer.update(*_kv(3, 6, 0))
        layer.crop(-2)  # 4 positions left: a prefix view of the buffer, overwritten by the next write
        layer.update(*_kv(3, 1, 1))
        layer.batch_select_indices(torch.tensor([2, 0]))  # a copy: the next write moves it into a new buffer
        layer.update(*_kv(2, 2, 2))
    assert grow.keys.shape == (2, 2, 7, 8)
    assert torch.equal(grow.keys, dyn.keys) and torch.equal(grow.values, dyn.values)


def test_cache_only_for_full_attention_llms():
    import transformers as tf

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
    cache = preallocated_cache(tf.Qwen2Config(**small), 40)
    assert cache is not None and len(cache.layers) == 2 and cache.layers[0].capacity == 40
    windowed = tf.Qwen2Config(**small, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert preallocated_cache(windowed, 40) is None
    assert preallocated_cache(tf.MistralConfig(**small, sliding_window=16), 40) is None


def test_generation_with_the_preallocated_cache_equals_recomputation(build_model):
    """generate_ids sizes the buffers for prompt + new tokens; padded rows, x-attn and all: the same tokens."""
    model, processor = build_model("H")
    set_gates(model, 0.5)
    batch = processor([chat_prompt("Describe.", 1), chat_prompt("Hi", 0)], [[picture(150, 100)], []])
    cached = torch.stack(list(generate_ids(model, batch, 9, use_cache=True)), 1)
    uncached = torch.stack(list(generate_ids(model, batch, 9, use_cache=False)), 1)
    assert torch.equal(cached, uncached)
