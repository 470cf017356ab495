"""The served tokenizer over HTTP, for clients without a tokenizer folder (lm-evaluation-harness's remote
tokenizer, vLLM's shapes): ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``.

These routes run no model: ``/tokenize`` shows how text tokenizes, special tokens included (a client asks it
for the id of the end-of-sequence string); what may reach the model is decided by the generating routes.
``chat_template`` is the Jinja form of the ChatML that ``/v1/chat/completions`` renders, so a client that
applies it locally builds the same prompt.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from nvlm.serve.common import POST_ERRORS, Serving, documented, error
from nvlm.serve.protocol import MAX_TEXT, MAX_TOKENS

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, max_length=256)
    prompt: str = Field(max_length=MAX_TEXT)
    add_special_tokens: bool = Field(default=True, description="add the tokenizer's BOS/EOS where it adds any")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, max_length=256)
    tokens: list[int] = Field(max_length=MAX_TOKENS)


def tokenize_router(ctx: Serving) -> APIRouter:
    router = APIRouter()
    engine = ctx.engine
    tok, lock = engine.processor.tokenizer, engine.tokenizer_lock

    def encode(text: str, special: bool) -> list[int]:
        with lock:
            return list(tok(text, add_special_tokens=special)["input_ids"])

    def decode(ids: list[int]) -> str:
        with lock:
            return tok.decode(ids)

    @router.get("/tokenizer_info", responses=documented(401))
    async def tokenizer_info() -> dict[str, Any]:
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
            "chat_template": CHATML_TEMPLATE,
            "model_max_length": engine.max_len,
            "vocab_size": len(tok),
        }

    @router.post("/tokenize", responses=POST_ERRORS)
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        ids = await run_in_threadpool(encode, req.prompt, req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_len}

    @router.post("/detokenize", responses=POST_ERRORS)
    async def detokenize(req: DetokenizeRequest) -> Response:
        vocab = len(tok)
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            return error(400, f"tokens: id {bad} is outside the tokenizer's range [0, {vocab})", param="tokens")
        return JSONResponse({"prompt": await run_in_threadpool(decode, req.tokens)})

    return router
