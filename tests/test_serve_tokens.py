"""The tokenizer routes (``/tokenizer_info``, ``/tokenize``, ``/detokenize``: the shapes lm-eval's remote
tokenizer reads), ``--served-model-name``, and the token-count controls load generators rely on: ``ignore_eos``
gives exactly ``max_tokens`` tokens, ``min_tokens`` holds end-of-sequence back.

python -m pytest tests/test_serve_tokens.py -q
"""

from __future__ import annotations

import httpx
import jinja2
import openai
import pytest
from serve_util import served, user

from nvlm.data.chat import render_chat


@pytest.fixture(scope="module")
def server(build_model):
    built = build_model("D")
    with served(built, model_name="my-served-name") as (url, engine):
        yield url, engine, built[0]


def test_tokenizer_routes(server):
    url, engine, _ = server
    tok = engine.processor.tokenizer
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["model_max_length"] == engine.max_len and info["vocab_size"] == len(tok)
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A"},
    ]
    template = jinja2.Environment().from_string(info["chat_template"])
    for msgs, gen in ((messages, False), (messages[:2], True)):  # what the chat route renders
        assert template.render(messages=msgs, add_generation_prompt=gen) == render_chat(msgs, gen)

    text = "Hello, world! <|im_end|>"
    r = httpx.post(url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r == {
        "tokens": tok(text, add_special_tokens=False)["input_ids"],
        "count": len(r["tokens"]),
        "max_model_len": engine.max_len,
    }
    assert r["tokens"][-1] == tok.convert_tokens_to_ids("<|im_end|>")  # special tokens as the tokenizer reads them
    eos = httpx.post(url + "/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert eos["tokens"] == [tok.eos_token_id]  # how lm-eval's remote tokenizer finds eos_token_id
    back = httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": text}
    for bad in ({"tokens": [len(tok)]}, {"tokens": [-1]}, {"tokens": "abc"}, {}):
        res = httpx.post(url + "/detokenize", json=bad)
        assert res.status_code == 400 and res.json()["error"]["message"], bad
    assert httpx.post(url + "/tokenize", json={"add_special_tokens": False}).status_code == 400
    paths = httpx.get(url + "/openapi.json").json()["paths"]
    for route in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        assert "requestBody" in paths[route]["post"], route  # the schema the server validates, published


def test_ignore_eos_and_min_tokens_set_the_answer_length(server):
    url, engine, model = server
    eos = engine.processor.tokenizer.eos_token_id
    real = model.forward

    def eager_to_stop(*args, **kwargs):  # this model now wants to end every answer at once
        out = real(*args, **kwargs)
        out.logits[..., eos] += 100.0
        return out

    model.forward = eager_to_stop
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["my-served-name"]
        short = client.chat.completions.create(
            model="my-served-name", messages=user("Hi"), max_tokens=12, temperature=0
        )
        assert short.usage.completion_tokens == 1 and short.choices[0].finish_reason == "stop"
        for n in (1, 7, 12):
            r = client.chat.completions.create(
                model="m", messages=user("Hi"), max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
            )
            assert r.usage.completion_tokens == n and r.choices[0].finish_reason == "length"
            c = client.completions.create(model="m", prompt="Hi", max_tokens=n, extra_body={"ignore_eos": True})
            assert c.usage.completion_tokens == n and c.choices[0].finish_reason == "length"
        stream = client.chat.completions.create(
            model="m",
            messages=user("Hi"),
            max_completion_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        assert list(stream)[-1].usage.completion_tokens == 9
        r = client.chat.completions.create(
            model="m", messages=user("Hi"), max_tokens=12, temperature=0, extra_body={"min_tokens": 5}
        )
        assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "stop"  # 5 tokens, then eos
        r = client.completions.create(
            model="m", prompt="Hi", max_tokens=12, temperature=0.7, extra_body={"min_tokens": 3}
        )
        assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "stop"
    finally:
        model.forward = real
