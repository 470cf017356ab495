"""The OpenAI-compatible API with the official ``openai`` client, for D, X and H: plain and streamed answers
equal ``model.generate`` (greedy), streamed deltas concatenate to the plain answer, usage, several images,
n, /v1/models, /health, /metrics, the API key.

python -m pytest tests/test_serve_api.py -q
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import picture
from serve_util import data_url, served, user

from nvlm.data.chat import render_chat


@pytest.mark.parametrize("arch", ["D", "X", "H"])
def test_openai_client_plain_stream_and_images(build_model, arch):
    model, processor = build_model(arch)
    imgs = [picture(150, 100), picture(60, 140, 1)]
    with served((model, processor)) as (url, engine):
        want_one = model.generate(
            processor, render_chat([{"role": "user", "content": "<image>\nWhat is this?"}]), imgs[:1], max_new_tokens=8
        )
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(
            model="nvlm", messages=user("What is this?", data_url(imgs[0])), max_tokens=8, temperature=0
        )
        assert r.choices[0].message.content == want_one
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 8
        assert r.usage.prompt_tokens == len(
            engine.processor.encode(
                render_chat([{"role": "user", "content": "<image>\nWhat is this?"}]), imgs[:1]
            ).input_ids
        )
        assert r.usage.total_tokens == r.usage.prompt_tokens + 8

        # a system message, two images in one message, several turns; streamed with usage
        messages = [{"role": "system", "content": "Be brief."}] + user("Compare.", *map(data_url, imgs))
        messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "More?"}]
        prompt = render_chat(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "<image>\n<image>\nCompare."},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "More?"},
            ]
        )
        want = model.generate(processor, prompt, imgs, max_new_tokens=10)
        plain = client.chat.completions.create(model="nvlm", messages=messages, max_completion_tokens=10, temperature=0)
        stream = client.chat.completions.create(
            model="nvlm",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        deltas = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert plain.choices[0].message.content == deltas == want
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert [m.id for m in client.models.list().data] == ["nvlm"]


def test_raw_sse_frames_done_and_image_info(build_model):
    model, processor = build_model("H")
    with served((model, processor)) as (url, _):
        body = {
            "messages": user("Describe.", data_url(picture(1000, 500))),
            "max_tokens": 5,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            frames = [line for line in r.iter_lines() if line]
        assert all(f.startswith("data: ") for f in frames) and frames[-1] == "data: [DONE]"
        first = json.loads(frames[0][6:])
        info = first["nvlm"]["images"][0]
        assert info["grid"] == [2, 1] and info["num_tiles"] == 3 and info["thumbnail"] is True
        per_tile = processor.tokens_per_tile
        assert info["tokens"] == {"decoder": per_tile, "xattn": 2 * per_tile}  # H: thumbnail in the decoder


def test_n_seed_health_metrics_and_api_key(build_model, tmp_path):
    model, processor = build_model("D")
    with served((model, processor), api_key="s3cret") as (url, _):
        assert httpx.get(url + "/health").status_code == 200  # open for probes
        bad = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": user("hi")},
            headers={"Authorization": "Bearer wrong"},
        )
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        r = client.chat.completions.create(
            model="nvlm", messages=user("hi"), max_tokens=6, n=2, seed=3, temperature=0.8
        )
        again = client.chat.completions.create(
            model="nvlm", messages=user("hi"), max_tokens=6, n=2, seed=3, temperature=0.8
        )
        assert [c.index for c in r.choices] == [0, 1]
        assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
        assert r.usage.completion_tokens == 12
        text = httpx.get(url + "/metrics", headers={"Authorization": "Bearer s3cret"}).text
        assert 'nvlm:http_requests_total{code="401"} 2' in text
        assert 'nvlm:request_success_total{finished_reason="length"} 4' in text
        assert "nvlm:time_to_first_token_seconds_count 4" in text
        assert "nvlm:num_requests_in_flight 0" in text


def test_top_k_reaches_the_sampler(build_model):
    # top_k=1 leaves one candidate: at temperature 1.2 the answer is the greedy one, whatever the seed; vLLM's -1
    # means no cut (the request is accepted and samples)
    model, processor = build_model("D")
    with served((model, processor)) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        greedy = client.chat.completions.create(model="nvlm", messages=user("hi"), max_tokens=8, temperature=0)
        for seed in (1, 2, 3):
            top1 = client.chat.completions.create(
                model="nvlm",
                messages=user("hi"),
                max_tokens=8,
                temperature=1.2,
                seed=seed,
                extra_body={"top_k": 1},
            )
            assert top1.choices[0].message.content == greedy.choices[0].message.content
        text = client.completions.create(
            model="nvlm", prompt="hi", max_tokens=8, temperature=1.2, seed=1, extra_body={"top_k": 1}
        )
        plain = client.completions.create(model="nvlm", prompt="hi", max_tokens=8, temperature=0)
        assert text.choices[0].text == plain.choices[0].text
        anything = client.chat.completions.create(
            model="nvlm", messages=user("hi"), max_tokens=4, temperature=1.0, seed=1, extra_body={"top_k": -1}
        )
        assert anything.usage.completion_tokens >= 1
