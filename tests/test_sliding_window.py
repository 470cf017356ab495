"""LLM families with sliding-window attention (here Mistral v0.1's) generate and serve through the runner: one
prompt longer than the window equals recomputation, the engine serves requests within the window exactly
as the uncached reference, and refuses longer ones with a clear error.

python -m pytest tests/test_sliding_window.py -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import picture, set_gates

from nvlm.data.chat import chat_prompt
from nvlm.inference.generate import generate_ids
from nvlm.serve.engine import Engine, SamplingParams


@pytest.fixture(scope="module")
def mistral(backbones, tmp_path_factory):
    """A tiny Mistral LLM folder (with the tiny tokenizer) → build(arch, window) of NVLM on it."""
    import transformers as tf

    import nvlm
    from nvlm.testing.tiny import tiny_tokenizer

    def make(arch: str, window: int):
        root = tmp_path_factory.mktemp(f"mistral{window}")
        tok = tiny_tokenizer()
        torch.manual_seed(0)
        config = tf.MistralConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, sliding_window=window, tie_word_embeddings=False,
        )  # fmt: skip
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(root)
        tok.save_pretrained(root)
        torch.manual_seed(0)
        model, processor = nvlm.build(arch, llm=str(root), vision=str(backbones["internvl"]))
        set_gates(model.eval(), 0.5)
        return model, processor

    return make


@pytest.mark.parametrize("arch", ["D", "H"])
def test_one_prompt_past_the_window_equals_recomputation(mistral, arch):
    model, processor = mistral(arch, 24)
    batch = processor(chat_prompt("Describe.", 1), [picture(150, 100)])
    assert batch["input_ids"].shape[1] > 24
    cached = torch.stack(list(generate_ids(model, batch, 10)), 1)
    assert torch.equal(cached, torch.stack(list(generate_ids(model, batch, 10, use_cache=False)), 1))


def test_engine_serves_a_windowed_llm_within_its_window(mistral):
    model, processor = mistral("X", 256)
    jobs = [(chat_prompt("Describe.", 1), [picture(150, 100)]), (chat_prompt("Hi", 0), [])]
    want = [model.generate(processor, p, im, max_new_tokens=8, use_cache=False) for p, im in jobs]
    engine = Engine(model, processor, max_batch=2).start()
    try:
        with engine.hold():  # rows of different lengths decoded together
            reqs = [engine.submit(p, im, SamplingParams(max_tokens=8)) for p, im in jobs]
        assert [r.result() for r in reqs] == want
        with pytest.raises(ValueError, match="sliding window of 256"):
            engine.submit(*jobs[1], SamplingParams(max_tokens=300))
    finally:
        engine.close()
