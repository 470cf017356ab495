"""Structured outputs of ``nvlm serve`` on a tiny random model: OpenAI's ``response_format`` (``json_object``,
``json_schema``) and vLLM's ``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``) on chat and text
completions, plain and streamed. An answer that ends with "stop" parses and follows its schema (nested objects,
enums, arrays); a schema the grammar library cannot compile is a 400 with its reason; an unconstrained row
batched with a constrained one answers as it does alone.

python -m pytest tests/test_serve_structured.py -q
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
import torch
from serve_util import served

pytest.importorskip("xgrammar")

from nvlm.data.chat import chat_prompt  # noqa: E402
from nvlm.serve.engine import SamplingParams  # noqa: E402
from nvlm.serve.grammar import Spec, TokenMasks, bounded_strings, grammars_for  # noqa: E402

# bounded (maxItems, maxLength, enums, integer ranges) so that a random model's answer ends within max_tokens
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["invoice", "receipt", "form"]},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "items": {
            "type": "array",
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 6},
                    "qty": {"type": "integer", "minimum": 0, "maximum": 99},
                    "size": {"type": "object", "properties": {"w": {"type": "boolean"}}, "required": ["w"]},
                },
                "required": ["name", "qty", "size"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "kind", "tags", "items"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe the picture."}]


@pytest.fixture(scope="module")
def server(build_model):
    with served(build_model("D")) as (url, engine):
        yield url, engine


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def chat(url: str, **body) -> httpx.Response:
    return post(url, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 256, "temperature": 0, **body})


def validate(doc, schema: dict) -> None:
    """`doc` follows `schema` (jsonschema when installed, else the subset SCHEMA uses, checked by hand)."""
    try:
        import jsonschema
    except ImportError:
        return _by_hand(doc, schema)
    jsonschema.validate(doc, schema)


def _by_hand(doc, s: dict) -> None:
    if "enum" in s:
        assert doc in s["enum"]
    kind = s.get("type")
    if kind == "object":
        assert isinstance(doc, dict) and set(s.get("required", [])) <= set(doc)
        if s.get("additionalProperties") is False:
            assert set(doc) <= set(s["properties"])
        for k, v in doc.items():
            if k in s.get("properties", {}):
                _by_hand(v, s["properties"][k])
    elif kind == "array":
        assert isinstance(doc, list) and len(doc) <= s.get("maxItems", len(doc))
        for v in doc:
            _by_hand(v, s["items"])
    elif kind == "string":
        assert isinstance(doc, str) and s.get("minLength", 0) <= len(doc) <= s.get("maxLength", len(doc))
    elif kind == "integer":
        assert isinstance(doc, int) and s.get("minimum", doc) <= doc <= s.get("maximum", doc)
    elif kind == "boolean":
        assert isinstance(doc, bool)


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "doc", "schema": schema, "strict": True}}


def test_json_object_on_chat_and_completions(server):
    url, _ = server
    r = chat(url, response_format={"type": "json_object"})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert isinstance(json.loads(choice["message"]["content"]), dict)
    r = post(
        url,
        "/v1/completions",
        {"prompt": "{", "max_tokens": 64, "temperature": 0, "response_format": {"type": "json_object"}},
    )
    assert r.status_code == 200, r.text
    assert isinstance(json.loads(r.json()["choices"][0]["text"]), dict)


def test_json_schema_nested_enums_arrays_greedy_and_sampled(server):
    url, _ = server
    answers = [chat(url, response_format=json_schema_format(SCHEMA))]
    answers.append(chat(url, response_format=json_schema_format(SCHEMA), temperature=1.0, seed=3, n=4))
    docs = []
    for r in answers:
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            assert choice["finish_reason"] == "stop", choice
            doc = json.loads(choice["message"]["content"])  # strict JSON: no raw control characters in strings
            validate(doc, SCHEMA)
            assert list(doc) == list(SCHEMA["properties"])  # generated in the schema's order
            docs.append(doc)
    assert any(d["items"] for d in docs) and any(d["tags"] for d in docs)  # the arrays were exercised, not empty


def test_vllm_json_on_completions(server):
    url, _ = server
    body = {"prompt": "Answer:", "max_tokens": 256, "temperature": 1.0, "seed": 1, "n": 2}
    r = post(url, "/v1/completions", {**body, "structured_outputs": {"json": json.dumps(SCHEMA)}})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        validate(json.loads(choice["text"]), SCHEMA)


def test_regex_and_choice(server):
    url, _ = server
    pattern = r"[a-z]{2,6}-[0-9]{1,3}( ok)?"
    for seed in range(3):
        r = chat(url, structured_outputs={"regex": pattern}, temperature=1.0, seed=seed)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and re.fullmatch(pattern, choice["message"]["content"])
    options = ["yes", "no", 'say "maybe"\n', "café"]
    seen = set()
    for seed in range(6):
        r = post(
            url,
            "/v1/completions",
            {
                "prompt": "Q:",
                "max_tokens": 16,
                "temperature": 1.0,
                "seed": seed,
                "structured_outputs": {"choice": options},
            },
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["text"] in options
        seen.add(choice["text"])
    assert len(seen) > 1  # the sampler still chooses among them


def test_ebnf_grammar(server):
    url, _ = server
    grammar = 'root ::= "(" num ("," num)? ")"\nnum ::= [0-9] | [1-9] [0-9]'
    r = chat(url, structured_outputs={"grammar": grammar}, temperature=1.0, seed=5)
    assert r.status_code == 200, r.text
    assert re.fullmatch(r"\((\d|[1-9]\d)(,(\d|[1-9]\d))?\)", r.json()["choices"][0]["message"]["content"])


def test_streamed_chunks_make_one_valid_document(server):
    url, _ = server
    body = {"messages": MESSAGES, "max_tokens": 256, "temperature": 1.0, "seed": 7, "stream": True}
    body["response_format"] = json_schema_format(SCHEMA)
    pieces, reasons = [], []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    pieces.append(c["delta"].get("content") or "")
                    reasons.append(c["finish_reason"])
    assert reasons[-1] == "stop" and len([p for p in pieces if p]) > 3
    validate(json.loads("".join(pieces)), SCHEMA)


@pytest.mark.parametrize(
    ("constraint", "reason"),
    [
        ({"response_format": json_schema_format({"type": "frobnicate"})}, 'Unsupported type "frobnicate"'),
        ({"response_format": json_schema_format({"$ref": "#/nowhere"})}, "nowhere"),
        ({"structured_outputs": {"regex": "(ab"}}, "parenthesis is not closed"),
        ({"structured_outputs": {"regex": r"(a)\1"}}, "Backreference is not supported"),
        ({"structured_outputs": {"grammar": "root ::= "}}, "EBNF parser error"),
        ({"structured_outputs": {"json": "{not json"}}, "not JSON"),
        ({"structured_outputs": {"json": {"type": "string", "pattern": "a", "maxLength": 3}}}, "pattern and minLength"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one of"),
        ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "not both"),
        ({"response_format": {"type": "json_object"}, "min_tokens": 3}, "min_tokens and ignore_eos"),
    ],
)
def test_uncompilable_is_400_with_the_reason_and_serving_goes_on(server, constraint, reason):
    url, _ = server
    r = chat(url, **constraint)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert reason in message and "\n" not in message and ".cc:" not in message
    ok = chat(url, max_tokens=2)
    assert ok.status_code == 200


def test_constrained_and_free_rows_in_one_batch(server):
    """Greedy: the free row answers exactly as alone; the constrained row, batched with it, still parses."""
    _, engine = server
    grammar = grammars_for(engine).compile(Spec.of_schema(SCHEMA, strict=True))
    free = SamplingParams(max_tokens=24)
    alone = engine.submit(chat_prompt("What is in the image?", 0), [], free)
    alone.result()
    with engine.hold():  # both are prefilled, then decoded, together
        shaped = engine.submit(chat_prompt("Describe it.", 0), [], SamplingParams(max_tokens=256, grammar=grammar))
        mixed = engine.submit(chat_prompt("What is in the image?", 0), [], free)
    validate(json.loads(shaped.result()), SCHEMA)
    mixed.result()
    assert shaped.finish_reason == "stop"
    assert mixed.output_ids == alone.output_ids and mixed.finish_reason == alone.finish_reason


def test_compiled_once_per_schema_text(server):
    _, engine = server
    grammars = grammars_for(engine)
    assert grammars_for(engine) is grammars  # the tokenizer's vocabulary is read once per engine
    spec = Spec.of_schema({"type": "array", "items": {"type": "integer"}, "maxItems": 4}, strict=False)
    grammars.compile(spec)
    size = grammars.compiler.get_cache_size_bytes()
    grammars.compile(Spec.of_schema({"type": "array", "items": {"type": "integer"}, "maxItems": 4}, strict=False))
    assert grammars.compiler.get_cache_size_bytes() == size > 0


def test_mask_covers_logits_wider_than_the_vocabulary(server):
    """A model's logits may be wider than its tokenizer (padded embeddings): those columns are masked too."""
    _, engine = server
    grammar = grammars_for(engine).compile(Spec("regex", "[0-9]+"))
    from nvlm.serve.grammar import Matcher

    vocab = grammar.tokenizer_info.vocab_size
    logits = torch.zeros(3, vocab + 40)
    TokenMasks().apply(logits, [1], [Matcher(grammar)])
    allowed = set((logits[1] > float("-inf")).nonzero().flatten().tolist())
    tok = engine.processor.tokenizer
    assert allowed and all(i < vocab and tok.decode([i]).isdigit() for i in allowed)
    assert torch.all(logits[0] == 0) and torch.all(logits[2] == 0)  # rows without a grammar are untouched


def test_bounded_strings_become_patterns():
    schema = {
        "type": "object",
        "properties": {"maxLength": {"type": "string", "maxLength": 3}, "b": {"enum": [{"minLength": 2}]}},
    }
    out = bounded_strings(schema)
    assert out["properties"]["maxLength"] == {"type": "string", "pattern": "^.{0,3}$"}
    assert out["properties"]["b"] == {"enum": [{"minLength": 2}]}  # data, not a schema
    assert bounded_strings({"minLength": 2}) == {"pattern": "^.{2,}$"}


def test_bench_structured_measures_both_side_by_side(build_model):
    from nvlm.bench.structured import measure, render

    model, processor = build_model("D")
    r = measure(model, processor, rows=2, requests=4, max_tokens=6, rounds=1)
    assert r["us_per_token_free"] > 0 and r["us_per_token_json"] > 0 and r["grammar_us_per_token"] > 0
    assert r["ratio"] == pytest.approx(r["us_per_token_json"] / r["us_per_token_free"])
    assert r["answers"] == 4 and r["parsed"] == r["stopped"] <= 4
    assert "without a grammar" in render(r)


def test_openai_client_parse_with_a_pydantic_model(server):
    """The official client's ``chat.completions.parse``: a pydantic model → a strict JSON schema ($defs, enums,
    bounded lists and strings) → an answer it parses back into the model."""
    openai = pytest.importorskip("openai")
    from typing import Literal

    from pydantic import BaseModel, Field

    class Item(BaseModel):
        name: str = Field(max_length=6)
        qty: int = Field(ge=0, le=9)

    class Invoice(BaseModel):
        kind: Literal["invoice", "receipt"]
        items: list[Item] = Field(max_length=2)

    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    done = client.chat.completions.parse(
        model="nvlm", messages=MESSAGES, response_format=Invoice, temperature=1.0, seed=2, max_tokens=200, n=3
    )
    for choice in done.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Invoice)
