"""NVLM-X/H memory K/V reused by the serving engine: a repeated image skips every gated block's K/V projections
(kept in the encoder cache), a chunked prompt projects them at its first chunk only, and greedy answers stay
``model.generate``'s (cached and uncached rows in one batch included).

python -m pytest tests/test_serve_xattn_cache.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import picture, set_gates

from nvlm.data.chat import chat_prompt
from nvlm.inference.runner import ModelRunner
from nvlm.serve.encoder_cache import EncoderCache, memory_key
from nvlm.serve.engine import Engine, SamplingParams
from nvlm.serve.metrics import EngineMetrics


def _count_projections(model) -> list[int]:
    """The batch size of every K projection of a memory by a gated block, in call order."""
    calls: list[int] = []
    for block in model.xattn:
        block.k_proj.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("arch", ["X", "H"])
def test_given_memory_kv_gives_the_same_logits(build_model, arch):
    model, processor = build_model(arch)
    set_gates(model, 0.5)
    samples = [processor.encode(chat_prompt(q, 1), [picture(150, 100)]) for q in ("Describe.", "What color?")]
    batch = processor.collate(samples, padding_side="left")
    first = ModelRunner(model)
    want = first.prefill(batch, ["a", "b"])
    kv = {i: (k[:2], v[:2]) for i, (k, v) in first.memory.kv.items()}
    calls = _count_projections(model)
    again = ModelRunner(model)
    got = again.prefill(batch, ["a", "b"], memory_kv=kv)
    assert calls == []  # no block projected the memory
    assert torch.equal(got, want)
    assert torch.equal(again.decode(), first.decode())


@pytest.mark.parametrize("arch", ["X", "H"])
def test_repeated_image_skips_the_memory_projections(build_model, arch):
    model, processor = build_model(arch)
    set_gates(model, 0.5)
    image, other = picture(150, 100), picture(150, 100, seed=5)
    jobs = [(chat_prompt(q, 1), [image]) for q in ("Describe.", "What color?", "Describe.")]
    jobs.append((chat_prompt("Describe.", 1), [other]))
    want = [model.generate(processor, p, im, max_new_tokens=6) for p, im in jobs]
    calls = _count_projections(model)
    engine = Engine(model, processor, prefix_cache=False).start()  # a prefix hit would skip the image too
    try:
        got, projected = [], []
        for p, im in jobs:
            got.append(engine.generate(p, im, max_tokens=6))
            projected.append(len(calls))
    finally:
        engine.close()
    assert got == want
    blocks = len(model.xattn)
    assert projected == [blocks, blocks, blocks, 2 * blocks]  # the repeats project nothing
    counts = engine.metrics.counts
    assert (counts["xattn_kv_cache_queries"], counts["xattn_kv_cache_hits"]) == (4, 2)
    assert "nvlm:xattn_kv_cache_hits_total 2" in engine.metrics.render(0, 0, 0)


@pytest.mark.parametrize("arch", ["X", "H"])
def test_a_batch_mixing_cached_and_uncached_memories_equals_generate(build_model, arch):
    model, processor = build_model(arch)
    set_gates(model, 0.5)
    image, other = picture(150, 100), picture(120, 60, seed=3)
    warm = (chat_prompt("Describe.", 1), [image])
    mixed = [(chat_prompt("What color is it?", 1), [image]), (chat_prompt("Describe.", 1), [other])]
    mixed.append((chat_prompt("Hi", 0), []))
    want = [model.generate(processor, p, im, max_new_tokens=8) for p, im in mixed]
    engine = Engine(model, processor, prefix_cache=False).start()
    try:
        engine.generate(*warm, max_tokens=2)
        calls = _count_projections(model)
        with engine.hold():  # arrive together: prefilled in the same step
            reqs = [engine.submit(p, im, SamplingParams(max_tokens=8)) for p, im in mixed]
        got = [r.result() for r in reqs]
    finally:
        engine.close()
    assert got == want
    # one batch per block without the cached row: the new image's row and the text row (no memory) beside it
    assert calls == [2] * len(model.xattn)
    assert engine.metrics.counts["xattn_kv_cache_hits"] == 1


@pytest.mark.parametrize("arch", ["X", "H"])
@pytest.mark.parametrize("cache_gb", [0.0, 1.0])
def test_chunked_prompt_projects_its_memory_once(build_model, arch, cache_gb):
    model, processor = build_model(arch)
    set_gates(model, 0.5)
    job = (chat_prompt("Compare the two.", 2), [picture(120, 60, 1), picture(50, 50, 2)])
    want = model.generate(processor, *job, max_new_tokens=8)
    calls = _count_projections(model)
    chunks = []
    orig = model.forward
    model.forward = lambda *a, **kw: chunks.append(kw.get("position_ids") is not None) or orig(*a, **kw)
    engine = Engine(model, processor, max_prefill_tokens=16, encoder_cache_gb=cache_gb).start()
    try:
        first = engine.generate(*job, max_tokens=8)
        after_first = len(calls)
        second = engine.generate(*job, max_tokens=8)
    finally:
        engine.close()
        del model.forward
    assert first == second == want
    assert len(processor.encode(*job).input_ids) > 3 * 16  # really prefilled in several chunks
    assert after_first == len(model.xattn)  # once per block, at the first chunk
    # the same prompt again: from the cache when there is one, else projected once more
    assert len(calls) == (1 if cache_gb == 0 else 0) * len(model.xattn) + after_first


def test_memory_kv_share_the_encoder_cache_bound(build_model):
    model, processor = build_model("X")
    metrics = EngineMetrics()
    a, b = (processor.encode(chat_prompt("Hi", 1), [picture(150, 100, seed=s)]) for s in (1, 2))
    keys_a, keys_b = [("a", a.pixel_values.shape[0])], [("b", b.pixel_values.shape[0])]
    assert memory_key(a, keys_a) != memory_key(a, keys_b)  # another image: another memory
    assert memory_key(processor.encode(chat_prompt("Hi", 0), []), []) is None  # no image: no memory
    kv = {0: (torch.ones(1, 2, 10, 4), torch.ones(1, 2, 10, 4))}  # 2 × 80 floats = 640 bytes
    cache = EncoderCache(1000, metrics)
    cache.keep_memory_kv(memory_key(a, keys_a), kv)
    assert metrics.gauges["encoder_cache_bytes"] == 640
    cache.keep_memory_kv(memory_key(b, keys_b), kv)  # over the bound: the older entry leaves
    assert cache.memory_kv(memory_key(a, keys_a)) is None
    held = cache.memory_kv(memory_key(b, keys_b))
    assert held is not None and torch.equal(held[0][0], kv[0][0]) and held[0][0] is not kv[0][0]  # a copy
    assert (metrics.counts["xattn_kv_cache_queries"], metrics.counts["xattn_kv_cache_hits"]) == (2, 1)
