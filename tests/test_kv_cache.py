"""The runner's KV pool (``nvlm.inference.kv_cache``): a row's column is its position, a left-padded prefill
lands left-aligned, a decoding step writes each row at its own column, a leaving row's place is taken by the
last row, buffers grow keeping their content; the memory K/V of X/H rows likewise.

python -m pytest tests/test_kv_cache.py -q
"""

from __future__ import annotations

import torch
from conftest import picture, set_gates

from nvlm.data.chat import chat_prompt
from nvlm.inference.generate import generate_ids
from nvlm.inference.kv_cache import KVPool, MemoryKV, Plan
from nvlm.models.xattn import XAttnState


def _kv(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, t, 8, generator=g), torch.randn(b, 2, t, 8, generator=g)


def test_pool_prefill_decode_move_and_growth():
    pool = KVPool(num_layers=1)
    k, v = _kv(2, 5, 0)  # row 0 has 3 real tokens (2 of left padding), row 1 has 5
    pool.reserve(2, 4)  # fewer columns than needed later: the pool grows, keeping what it holds
    pool.plan = Plan("prefill", 0, [3, 5], 5)
    pool.reserve(2, 6)
    assert pool.get_seq_length() == 0
    got_k, _ = pool.update(k, v, 0)
    assert got_k is k  # a prefill attends to itself
    pool.lengths += [3, 5]
    nk, nv = _kv(2, 1, 1)
    pool.plan = Plan("decode", width=6, pos=torch.tensor([3, 5]), rows=torch.arange(2))
    pool.reserve(2, 6)
    assert pool.get_seq_length() == 5 and pool.get_mask_sizes(1, 0) == (6, 0)
    keys, values = pool.update(nk, nv, 0)
    assert keys.shape == (2, 2, 6, 8)
    assert torch.equal(keys[0, :, :3], k[0, :, 2:]) and torch.equal(keys[0, :, 3], nk[0, :, 0])
    assert torch.equal(keys[1, :, :5], k[1]) and torch.equal(keys[1, :, 5], nk[1, :, 0])
    assert torch.equal(values[1, :, 5], nv[1, :, 0])
    pool.lengths[:] = [4, 6]
    pool.move(1, 0)  # row 0 leaves: row 1 takes its place
    assert pool.lengths[0] == 6 and torch.equal(pool.layers[0].k[0, :, :6], keys[1])


def test_memory_kv_rows_of_different_prefills():
    mem = MemoryKV()
    k1, v1 = _kv(1, 4, 2)
    mem.write(0, XAttnState(torch.zeros(1, 4, 3), torch.tensor([4]), {0: (k1, v1)}), [4])
    mem.write(1, None, [0])  # a text-only row: no memory, the blocks leave it unchanged
    k2, v2 = _kv(1, 6, 3)
    mem.write(2, XAttnState(torch.zeros(1, 6, 3), torch.tensor([6]), {0: (k2, v2)}), [6])
    state = mem.state(3)
    assert state.memory_len.tolist() == [4, 0, 6] and state.memory.shape[:2] == (3, 6)
    k, _ = state.kv[0]
    assert torch.equal(k[0, :, :4], k1[0]) and not k[0, :, 4:].any() and not k[1].any()
    assert torch.equal(k[2], k2[0])
    mem.move(2, 0)
    mem.truncate(2)
    assert mem.state(2).memory_len.tolist() == [6, 0]
    mem.move(1, 0)
    mem.truncate(1)
    assert mem.state(1) is None  # no row with an image left: the blocks are skipped


def test_generation_through_the_pool_equals_recomputation(build_model):
    """Padded rows, x-attn and all: the runner's steps give the tokens of recomputing the whole sequence."""
    model, processor = build_model("H")
    set_gates(model, 0.5)
    batch = processor([chat_prompt("Describe.", 1), chat_prompt("Hi", 0)], [[picture(150, 100)], []])
    cached = torch.stack(list(generate_ids(model, batch, 9, use_cache=True)), 1)
    uncached = torch.stack(list(generate_ids(model, batch, 9, use_cache=False)), 1)
    assert torch.equal(cached, uncached)
