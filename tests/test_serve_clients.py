"""Third-party clients as tests, without installing them: the request bodies that lm-evaluation-harness
(local-completions, its remote tokenizer, local-chat-completions), lmms-eval, VLMEvalKit's LMDeploy client
and GuideLLM send (written from their source, or recorded as sent through ``scripts/serve_proc.py --record``, in
``tests/fixtures/clients/``) are replayed against a served tiny model, and each response is read the way that
client reads it.

python -m pytest tests/test_serve_clients.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai.types
import openai.types.chat
import pytest
import torch
from serve_util import served

from nvlm.serve.media import MediaPolicy

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "clients").glob("*.json"))
NAME = "nvlm-internvl2"  # VLMEvalKit's LMDeploy client sends tile budgets only to ids naming InternVL2


@pytest.fixture(scope="module")
def server(build_model):
    built = build_model("D")
    with served(built, MediaPolicy(max_tiles=12), model_name=NAME) as (url, engine):
        yield url, engine, built[0]


def lm_eval_loglikelihood(r, req, engine, model):
    """lm-eval's ``parse_logprobs``: per choice (by index), the sum of token_logprobs[ctxlen:-1] and whether
    each of those equals the best of its top_logprobs; both must match a forward pass."""
    body = r.json()  # raw JSON, as lm-eval reads it (the echoed first token's logprob is null, as OpenAI's is)
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert len(choices) == len(req["ctxlens"]) == len(req["body"]["prompt"])
    for choice, ctxlen, ids in zip(choices, req["ctxlens"], req["body"]["prompt"], strict=True):
        lp = choice["logprobs"]
        total = sum(lp["token_logprobs"][ctxlen:-1])
        greedy = all(
            t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1])
        )
        assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt echoed, then the one new token
        with torch.no_grad():
            ref = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).logits[0].log_softmax(-1)
        want = sum(float(ref[t - 1, ids[t]]) for t in range(ctxlen, len(ids)))
        assert abs(total - want) < 1e-4, (total, want)
        assert greedy == all(int(ref[t - 1].argmax()) == ids[t] for t in range(ctxlen, len(ids)))


def lm_eval_generations(r, req, engine, model):
    body = openai.types.Completion.model_validate(r.json())
    assert [c.index for c in body.choices] == list(range(len(req["body"]["prompt"])))
    for c in body.choices:
        assert isinstance(c.text, str) and not any(s in c.text for s in req["body"]["stop"])
        assert c.finish_reason in ("stop", "length")


def lm_eval_tokenizer_info(r, req, engine, model):
    info = r.json()
    assert "eos_token" in info and "bos_token" in info and info["chat_template"]


def lm_eval_tokenize(r, req, engine, model):
    tokens = r.json()["tokens"]
    assert isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)
    if req["body"]["prompt"] == engine.processor.tokenizer.eos_token:
        assert tokens[0] == engine.processor.tokenizer.eos_token_id  # RemoteTokenizer.eos_token_id


def lm_eval_detokenize(r, req, engine, model):
    assert r.json()["prompt"] == engine.processor.tokenizer.decode(req["body"]["tokens"])


def openai_chat(r, req, engine, model):
    body = openai.types.chat.ChatCompletion.model_validate(r.json())
    assert isinstance(body.choices[0].message.content, str)
    return body


def lm_eval_chat(r, req, engine, model):
    body = openai_chat(r, req, engine, model)
    assert [c.index for c in body.choices] == [0]
    assert not any(s in (body.choices[0].message.content or "") for s in req["body"]["stop"])


def models_first_id(r, req, engine, model):
    assert r.json()["data"][0]["id"] == NAME


def lmdeploy_chat(r, req, engine, model):
    openai_chat(r, req, engine, model)
    (image,) = r.json()["nvlm"]["images"]
    assert image["max_tiles"] == req["max_tiles"]  # the per-image budget was applied, not ignored


def health_ok(r, req, engine, model):
    """GuideLLM's backend ``validate``: GET /health must answer 2xx before a run starts."""
    assert 200 <= r.status_code < 300


def load_stream(r, req, engine, model):
    """GuideLLM's ``add_streaming_line``: id, text deltas, and the usage of the last chunk; ignore_eos means
    exactly the asked number of tokens."""
    frames = [line[len("data:") :].strip() for line in r.text.splitlines() if line.startswith("data:")]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    chat = req["path"] == "/v1/chat/completions"
    for c in chunks:
        if chat:  # (the SDK builds completion chunks unvalidated: its Completion type wants a finish_reason)
            openai.types.chat.ChatCompletionChunk.model_validate(c)
        assert c["id"] == chunks[0]["id"]
    text = "".join(
        (c["choices"][0]["delta"].get("content") or "") if chat else c["choices"][0]["text"]
        for c in chunks
        if c["choices"]
    )
    assert isinstance(text, str)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == req["output_tokens"]


CHECKS = {
    f.__name__: f
    for f in (
        lm_eval_loglikelihood,
        lm_eval_generations,
        lm_eval_tokenizer_info,
        lm_eval_tokenize,
        lm_eval_detokenize,
        openai_chat,
        lm_eval_chat,
        models_first_id,
        lmdeploy_chat,
        health_ok,
        load_stream,
    )
}


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_recorded_client_requests(server, path):
    url, engine, model = server
    fixture = json.loads(path.read_text())
    assert fixture["client"] and fixture["source"] and fixture["requests"]
    for req in fixture["requests"]:
        r = httpx.request(req["method"], url + req["path"], json=req.get("body"), timeout=120)
        assert r.status_code == 200, (path.name, req["path"], r.text[:300])
        CHECKS[req["check"]](r, req, engine, model)


def test_every_client_is_recorded():
    names = {p.stem for p in FIXTURES}
    assert {
        "lm_eval_local_completions_loglikelihood",
        "lm_eval_local_chat_completions",
        "lmms_eval_openai",
        "vlmevalkit_lmdeploy",
        "guidellm_streams",
        "guidellm_recorded",
    } <= names
