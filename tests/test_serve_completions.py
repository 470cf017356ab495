"""``/v1/completions`` and chat ``logprobs``: every prompt and output log-probability equals the model's own
forward pass (``model(**batch).logits.log_softmax(-1)``) to 1e-5, for text and token-id prompts, batched with
left padding or alone, plain and streamed; echo, ``max_tokens: 0`` scoring, n, several prompts, bad requests.

python -m pytest tests/test_serve_completions.py -q
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from serve_util import served, user

from nvlm.data.chat import render_chat
from nvlm.inference.generate import generate_ids
from nvlm.serve.engine import Engine, SamplingParams

TOL = 1e-5


@pytest.fixture(scope="module")
def server(build_model):
    built = build_model("D")
    with served(built) as (url, engine):
        yield url, engine, built[0]


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[T, vocab] log-probabilities of one unpadded sequence: row t predicts token t + 1."""
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    with torch.no_grad():
        return model(**batch).logits[0].float().log_softmax(-1)


def greedy(model, engine, prompt: str, n: int) -> list[int]:
    batch = engine.processor([prompt])
    return [int(t[0]) for t in generate_ids(model, batch, n)]


def check_logprobs(lp: dict, ids: list[int], ref: torch.Tensor, pieces, first: int = 0) -> float:
    """`lp` (completions shape) against the forward pass `ref` for `ids`; position i of `lp` is token
    first + i of `ids`. Returns the largest difference seen."""
    worst = 0.0
    assert lp["tokens"] == [pieces(t) for t in ids[first:]]
    offsets = [0]
    for s in lp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(s))
    assert lp["text_offset"] == offsets
    for i, (value, top) in enumerate(zip(lp["token_logprobs"], lp["top_logprobs"], strict=True)):
        pos = first + i
        if pos == 0:
            assert value is None and top is None  # nothing precedes the first token
            continue
        row = ref[pos - 1]
        worst = max(worst, abs(value - float(row[ids[pos]])))
        assert abs(max(top.values()) - float(row.max())) < TOL  # lm-eval's is_greedy reads this
        for piece, v in top.items():  # every listed alternative is a token with that text and that logprob
            cands = [float(row[t]) for t in range(row.shape[0]) if pieces(t) == piece]
            assert min(abs(v - c) for c in cands) < TOL, (piece, v)
    assert worst < TOL, worst
    return worst


def test_echo_logprobs_equal_a_forward_pass(server):
    url, engine, model = server
    pieces = lambda t: engine.processor.tokenizer.decode([t])  # noqa: E731
    prompt = "The quick brown fox jumps over"
    body = {"prompt": prompt, "max_tokens": 4, "logprobs": 5, "echo": True, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    choice = r["choices"][0]
    prompt_ids = engine.processor.encode(prompt).input_ids
    new = greedy(model, engine, prompt, r["usage"]["completion_tokens"])
    ids = prompt_ids + new
    worst = check_logprobs(choice["logprobs"], ids, forward_logprobs(model, ids), pieces)
    print(f"echo: {len(ids) - 1} positions, max |server - forward| = {worst:.2e}")
    assert r["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 4, "total_tokens": len(ids)}
    assert choice["text"] == prompt + engine.processor.tokenizer.decode(new, skip_special_tokens=True)
    assert choice["finish_reason"] == "length" and r["object"] == "text_completion"
    for v, top in zip(choice["logprobs"]["token_logprobs"][len(prompt_ids) :], choice["logprobs"]["top_logprobs"][-4:]):
        assert v == max(top.values())  # greedy tokens are the most likely: lm-eval's is_greedy holds exactly

    # without echo: only the new tokens, offsets from the start of the answer
    body = {"prompt": prompt, "max_tokens": 4, "logprobs": 0, "temperature": 0}
    plain = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert plain["text"] == choice["text"][len(prompt) :]
    check_logprobs(plain["logprobs"], ids, forward_logprobs(model, ids), pieces, first=len(prompt_ids))
    assert all(len(top) == 1 for top in plain["logprobs"]["top_logprobs"])  # logprobs 0: the token itself


def test_token_id_prompts_batched_and_scored_only(server):
    """lm-eval's shape: token ids, several prompts in one body, ``max_tokens: 0`` scores the prompt alone."""
    url, engine, model = server
    tok = engine.processor.tokenizer
    texts = ["Question: what is two plus two? Answer: four", "Hi", "A longer context, with some more words in it."]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    body = {"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    total = sum(map(len, prompts))
    assert r["usage"] == {"prompt_tokens": total, "completion_tokens": 0, "total_tokens": total}
    for ids, choice in zip(prompts, r["choices"], strict=True):
        assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
        assert len(choice["logprobs"]["token_logprobs"]) == len(ids)
        check_logprobs(choice["logprobs"], ids, forward_logprobs(model, ids), lambda t: tok.decode([t]))


def test_left_padded_prefill_scores_each_prompt_as_alone(build_model):
    """Prompts of different lengths prefilled together (left padding) score exactly as each alone."""
    model, processor = build_model("D")
    engine = Engine(model, processor, max_batch=4).start()
    tok = engine.processor.tokenizer
    try:
        prompts = [tok(t)["input_ids"] for t in ("short one", "a much longer prompt than the first one is", "mid")]
        sizes = []
        real = model.forward
        model.forward = lambda *a, **k: (
            sizes.append(k["input_ids"].shape if "input_ids" in k else None) or real(*a, **k)
        )
        params = SamplingParams(max_tokens=2, logprobs=3, prompt_logprobs=3)
        with engine.hold():  # all three wait for one prefill
            reqs = [engine.submit(p, None, params) for p in prompts]
        for r in reqs:
            r.result()
        assert sizes[0] == (3, max(map(len, prompts)))  # one padded prefill of the three
        model.forward = real
        for p, r in zip(prompts, reqs, strict=True):
            ids = p + r.output_ids
            ref = forward_logprobs(model, ids)
            got = [e.logprob for e in r.prompt_logprobs[1:]] + [e.logprob for e in r.logprobs]
            want = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
            assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < TOL
            assert [t for t, _ in r.logprobs[0].top] == ref[len(p) - 1].topk(3).indices.tolist()
    finally:
        engine.close()


def test_stream_n_and_seed(server):
    url, engine, _ = server
    body = {"prompt": ["One", "Two words"], "max_tokens": 5, "n": 2, "seed": 7, "temperature": 1.0, "logprobs": 2}
    plain = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    again = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in plain["choices"]] == [c["text"] for c in again["choices"]]  # seeded
    assert plain["usage"]["completion_tokens"] == 20
    body |= {"stream": True, "stream_options": {"include_usage": True}, "echo": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        frames = [json.loads(line[6:]) for line in r.iter_lines() if line and line != "data: [DONE]"]
    texts, tokens, lps = ["", "", "", ""], [[], [], [], []], [[], [], [], []]
    for f in frames[:-1]:
        (c,) = f["choices"]
        texts[c["index"]] += c["text"]
        if c["logprobs"]:
            tokens[c["index"]] += c["logprobs"]["tokens"]
            lps[c["index"]] += c["logprobs"]["token_logprobs"]
    assert frames[-1]["choices"] == [] and frames[-1]["usage"] == plain["usage"]
    prompts = ["One", "One", "Two words", "Two words"]
    for k, c in enumerate(plain["choices"]):
        assert texts[k] == prompts[k] + c["text"]  # the echo, then the same seeded answer
        assert tokens[k][-5:] == c["logprobs"]["tokens"]
        assert lps[k][-5:] == pytest.approx(c["logprobs"]["token_logprobs"], abs=TOL)
        assert lps[k][0] is None  # the echoed prompt's first token


def test_chat_logprobs_equal_a_forward_pass(server):
    url, engine, model = server
    body = {"messages": user("Name a color."), "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    content = r["choices"][0]["logprobs"]["content"]
    prompt = render_chat([{"role": "user", "content": "Name a color."}])
    prompt_ids = engine.processor.encode(prompt).input_ids
    new = greedy(model, engine, prompt, len(content))
    ref = forward_logprobs(model, prompt_ids + new)
    tok = engine.processor.tokenizer
    for i, (entry, t) in enumerate(zip(content, new, strict=True)):
        row = ref[len(prompt_ids) + i - 1]
        assert entry["token"] == tok.decode([t]) and entry["bytes"] == list(entry["token"].encode())
        assert abs(entry["logprob"] - float(row[t])) < TOL
        assert [e["logprob"] for e in entry["top_logprobs"]] == pytest.approx(row.topk(3).values.tolist(), abs=TOL)
    body |= {"stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as s:
        frames = [json.loads(line[6:]) for line in s.iter_lines() if line and line != "data: [DONE]"]
    streamed = [e for f in frames for c in f["choices"] if c.get("logprobs") for e in c["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=TOL)
    off = httpx.post(url + "/v1/chat/completions", json={"messages": user("x"), "max_tokens": 1}, timeout=60).json()
    assert off["choices"][0]["logprobs"] is None


BAD = {
    "logprobs over 20": {"prompt": "x", "logprobs": 21},
    "negative max_tokens": {"prompt": "x", "max_tokens": -1},
    "empty prompt": {"prompt": ""},
    "empty id list": {"prompt": []},
    "id out of range": {"prompt": [1, 10**6]},
    "negative id": {"prompt": [-1]},
    "reserved text": {"prompt": "hi <|im_start|>system"},
    "image placeholder": {"prompt": "<image>\nWhat?"},
    "min_tokens over max_tokens": {"prompt": "x", "max_tokens": 2, "min_tokens": 3},
    "too many prompts": {"prompt": ["x"] * 65},
    "refused field": {"prompt": "x", "logit_bias": {"1": 5}},
    "context": {"prompt": "x", "max_tokens": 999_999},
    "not an object": [1, 2],
}


def test_bad_completions_get_400_and_the_server_keeps_serving(server):
    url, engine, _ = server
    for name, body in BAD.items():
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["message"], name
    pad = engine.processor.pad_id
    r = httpx.post(url + "/v1/completions", json={"prompt": [1, pad]}, timeout=30)
    assert r.status_code == 400 and "image-pad" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "repetition_penalty": 1.3}, timeout=30)
    assert r.status_code == 400 and "penalties" in r.json()["error"]["message"]
    body = {"prompt": "x", "max_tokens": 2, "ignore_eos": True, "repetition_penalty": 1.0}  # neutral: accepted
    ok = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
