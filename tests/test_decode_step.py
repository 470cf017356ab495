"""Decoding steps through the LLM's layers one after the other (``nvlm.models.llm.decode_step``) are bitwise
the LLM's own forward: the same logits at every step, padded or not, for D, X and H, Qwen2 and Llama.

python -m pytest tests/test_decode_step.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import picture, set_gates

from nvlm.data.chat import chat_prompt
from nvlm.models.llm import layerwise_decode_ok


def _steps(model, batch, n: int, layerwise: bool) -> list[torch.Tensor]:
    """Logits of the prefill and of `n` greedy decoding steps, fed the same tokens in both modes."""
    model.layerwise_decode = layerwise
    batch = {k: v for k, v in batch.items() if k != "labels"}
    mask = batch["attention_mask"]
    with torch.inference_mode():
        out = model(**batch, use_cache=True, logits_to_keep=1)
        logits = [out.logits[:, -1]]
        cache, state = out.past_key_values, out.xattn_state
        position = mask.sum(-1, keepdim=True)
        for step in range(n):
            nxt = logits[-1].argmax(-1)[:, None]
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            padded = not bool(batch["attention_mask"].all())
            out = model(
                nxt,
                mask if padded else None,
                past_key_values=cache,
                xattn_state=state,
                use_cache=True,
                position_ids=position + step,
            )
            cache = out.past_key_values
            logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize(("arch", "llm"), [("D", "qwen2"), ("X", "qwen2"), ("H", "qwen2"), ("D", "llama")])
@pytest.mark.parametrize("padded", [True, False])
def test_layerwise_steps_equal_the_llm_forward_bitwise(build_model, arch, llm, padded):
    vision = "internvl" if llm == "qwen2" else "siglip"
    model, processor = build_model(arch, llm=llm, vision=vision)
    set_gates(model, 0.5)
    assert layerwise_decode_ok(model.llm)
    if padded:
        batch = processor([chat_prompt("Describe.", 1), chat_prompt("Hi", 0)], [[picture(150, 100)], []])
        assert not bool(batch["attention_mask"].all())
    else:
        batch = processor(chat_prompt("Describe.", 1), [picture(150, 100)])
    fast, slow = _steps(model, batch, 6, True), _steps(model, batch, 6, False)
    for i, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert torch.equal(a, b), f"step {i}: max |diff| {(a - b).abs().max().item()}"


def test_decoding_steps_skip_the_llm_forward(build_model):
    """The path is really taken: after the prefill, the LLM's own forward is not called (its layers are)."""
    model, processor = build_model("X")
    llm_calls, layer_calls = [], []
    model.llm.register_forward_pre_hook(lambda *_: llm_calls.append(1))
    model.llm.get_decoder().layers[-1].register_forward_pre_hook(lambda *_: layer_calls.append(1))
    batch = processor(chat_prompt("Describe.", 1), [picture(150, 100)])
    _steps(model, batch, 4, True)
    assert (len(llm_calls), len(layer_calls)) == (1, 5)
    llm_calls.clear()
    _steps(model, batch, 4, False)
    assert len(llm_calls) == 5


def test_several_new_tokens_per_step_attend_causally(build_model):
    """Two tokens fed at once after the prompt (a chunked step) see each other causally, as in the LLM's forward."""
    model, processor = build_model("D")
    batch = processor([chat_prompt("Describe.", 1), chat_prompt("Hi", 0)], [[picture(150, 100)], []])
    batch.pop("labels")
    new = torch.tensor([[5, 6], [7, 8]])
    results = []
    for layerwise in (True, False):
        model.layerwise_decode = layerwise
        with torch.inference_mode():
            out = model(**batch, use_cache=True, logits_to_keep=1)
            mask = torch.cat([batch["attention_mask"], torch.ones_like(new)], 1)
            position = batch["attention_mask"].sum(-1, keepdim=True) + torch.arange(2)
            step = model(new, mask, past_key_values=out.past_key_values, use_cache=True, position_ids=position)
        results.append(step.logits)
    assert results[0].shape[1] == 2 and torch.equal(results[0], results[1])


def test_families_outside_the_layerwise_path_keep_their_forward():
    import transformers as tf

    def llm(config):
        return tf.AutoModelForCausalLM.from_config(config)

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64)
    assert layerwise_decode_ok(llm(tf.MistralConfig(**small, sliding_window=None)))
    assert not layerwise_decode_ok(llm(tf.MistralConfig(**small, sliding_window=16)))  # windowed mask
    sliding = tf.Qwen2Config(**small, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert not layerwise_decode_ok(llm(sliding))
    gemma = tf.GemmaConfig(**small, head_dim=8)
    assert not layerwise_decode_ok(llm(gemma))  # scales its embeddings inside its forward
