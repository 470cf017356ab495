"""Generation: cached == uncached, batched == one by one, sampling, stop strings, streaming.

python -m pytest tests/test_generate.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import picture, set_gates

from nvlm.data.chat import chat_prompt
from nvlm.inference.generate import generate_ids, sample_next


def _run(model, batch, n, **kw):
    return torch.stack(list(generate_ids(model, batch, n, **kw)), dim=1)


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_cached_generation_equals_uncached(build_model, arch):
    model, processor = build_model(arch)
    set_gates(model, 0.5)
    batch = processor([chat_prompt("Describe.", 1), chat_prompt("Hi", 0)], [[picture(150, 100)], []])
    cached = _run(model, batch, 12, use_cache=True)
    uncached = _run(model, batch, 12, use_cache=False)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("arch", ["D", "X"])
def test_cached_generation_equals_uncached_without_padding(build_model, arch):
    # one sample: no padding, so decoding steps pass no attention mask (and X's blocks no memory mask)
    model, processor = build_model(arch)
    set_gates(model, 0.5)
    batch = processor(chat_prompt("Describe.", 1), [picture(150, 100)])
    assert bool(batch["attention_mask"].all())
    assert torch.equal(_run(model, batch, 10, use_cache=True), _run(model, batch, 10, use_cache=False))


def test_one_forward_per_token_and_ordinary_tensors(build_model):
    model, processor = build_model("D")
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    batch = processor(chat_prompt("Describe.", 1), [picture(150, 100)])
    steps = list(generate_ids(model, batch, 5))
    assert len(steps) == 5 and len(calls) == 5  # the prefill and 4 decoding steps: none for a 6th token
    assert not any(s.is_inference() for s in steps)  # usable outside inference mode, in place too
    steps[0].add_(1)


def test_decode_step_mask_is_made_once_and_none_when_all_memory_is_valid():
    from nvlm.models.xattn import XAttnState, xattn_mask

    full = XAttnState(memory=torch.zeros(2, 5, 4), memory_len=torch.tensor([5, 5]))
    assert full.step_mask(2, 1) == (None, None)
    part = XAttnState(memory=torch.zeros(2, 5, 4), memory_len=torch.tensor([5, 2]))
    allowed, row = part.step_mask(2, 1)
    want = xattn_mask(torch.zeros(2, 1, dtype=torch.long), torch.tensor([[5], [2]]), 5)
    assert torch.equal(allowed, want[0]) and torch.equal(row, want[1])
    assert part.step_mask(2, 1)[0] is allowed  # kept, not rebuilt every step


def test_cross_attention_kv_computed_once_per_image(build_model):
    model, processor = build_model("X")
    set_gates(model, 0.5)
    calls = []
    for block in model.xattn:
        orig = block.memory_kv
        block.memory_kv = lambda m, orig=orig: calls.append(1) or orig(m)
    batch = processor(chat_prompt("Describe.", 1), [picture(150, 100)])
    _run(model, batch, 6)
    assert len(calls) == len(model.xattn)  # once per block in the prefill, never while decoding


@pytest.mark.parametrize("arch", ["D", "H"])
def test_batched_generation_equals_one_by_one(build_model, arch):
    model, processor = build_model(arch)
    set_gates(model, 0.5)
    texts = [chat_prompt("What is 2+2?", 0), chat_prompt("Describe the two.", 2), chat_prompt("One", 1)]
    images = [[], [picture(120, 60), picture(50, 50, 1)], [picture(150, 100, 2)]]
    together = _run(model, processor(texts, images), 8)
    for i, (t, im) in enumerate(zip(texts, images)):
        assert torch.equal(together[i], _run(model, processor(t, im), 8)[0])


def test_sampling_is_seeded_and_top_p_small_is_greedy():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 2.9]])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [sample_next(logits, True, 1.0, 1.0, g1) for _ in range(20)]
    b = [sample_next(logits, True, 1.0, 1.0, g2) for _ in range(20)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len({tuple(x.tolist()) for x in a}) > 1  # it really samples
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        assert torch.equal(sample_next(logits, True, 1.0, 0.01, g), logits.argmax(-1))
    # top-p 0.8 on [0.5, 0.3, 0.2]: keeps the first two only
    probs_logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    seen = {int(sample_next(probs_logits, True, 1.0, 0.8, g)) for _ in range(200)}
    assert seen == {0, 1}


def test_stop_strings_streaming_and_eos(build_model):
    model, processor = build_model("D")
    prompt = chat_prompt("Describe.", 1)
    full = model.generate(processor, prompt, [picture(120, 60)], max_new_tokens=16)
    assert isinstance(full, str) and len(full) > 3
    pieces = list(model.generate(processor, prompt, [picture(120, 60)], max_new_tokens=16, stream=True))
    assert "".join(pieces) == full and len(pieces) > 1
    stop = full[2:4]
    cut = model.generate(processor, prompt, [picture(120, 60)], max_new_tokens=16, stop=[stop])
    assert cut == full[: full.find(stop)]
    streamed = "".join(
        model.generate(processor, prompt, [picture(120, 60)], max_new_tokens=16, stop=[stop], stream=True)
    )
    assert streamed == cut
    # an eos token ends the sample: make <|im_end|> the only possible token
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    vocab = model.llm.get_output_embeddings().weight.shape[0]

    class OnlyEos(torch.nn.Module):
        def forward(self, h):
            out = torch.zeros(*h.shape[:-1], vocab)
            out[..., im_end] = 1.0
            return out

    model.llm.lm_head = OnlyEos()
    steps = list(generate_ids(model, processor(prompt, [picture(120, 60)]), 10, eos_token_ids=[im_end]))
    assert len(steps) == 1 and model.generate(processor, prompt, [picture(120, 60)], max_new_tokens=10) == ""


def test_chat_answers_a_string(build_model):
    model, processor = build_model("H")
    answer = model.chat(processor, "What is in the picture?", image=picture(150, 100), max_new_tokens=5)
    assert isinstance(answer, str)


def test_image_pad_token_is_never_generated(build_model):
    model, processor = build_model("X")
    pad = processor.pad_id
    vocab = model.llm.get_output_embeddings().weight.shape[0]

    class PreferPad(torch.nn.Module):  # a head that always ranks the image-pad token first
        def forward(self, h):
            out = torch.zeros(*h.shape[:-1], vocab)
            out[..., pad] = 5.0
            out[..., 7] = 1.0
            return out

    model.llm.lm_head = PreferPad()
    batch = processor(chat_prompt("Describe.", 1), [picture(150, 100)])
    steps = torch.stack(list(generate_ids(model, batch, 4)), 1)
    assert (steps != pad).all() and (steps == 7).all()
