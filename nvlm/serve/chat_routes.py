"""``POST /v1/chat/completions``: OpenAI's chat completions over the engine, plain or streamed (SSE).

Images pass the media gate before anything is queued; each image's tile budget is the request's
(``image_url.max_dynamic_patch``, else ``mm_processor_kwargs.max_dynamic_patch``) clamped to the server's
ceiling, else the model's own; the response's ``nvlm.images`` reports what each image got. ``logprobs`` /
``top_logprobs`` are OpenAI's: each answer token's log-probability under the model and its best alternatives.
``response_format`` / ``structured_outputs`` are compiled here, on a worker thread of the server, before the
request is queued (a schema the grammar library cannot compile is a 400 with its reason).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from nvlm.serve.common import POST_ERRORS, Serving, collect, error, submit_all
from nvlm.serve.engine import SamplingParams
from nvlm.serve.grammar import grammars_for
from nvlm.serve.logprobs import Pieces, chat_logprobs
from nvlm.serve.media import MediaError
from nvlm.serve.protocol import ChatRequest, Sampling, build_prompt
from nvlm.serve.responses import image_info, stream_chunks, usage

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def compile_grammar(ctx: Serving, req: Sampling) -> Any:
    """The request's compiled grammar (None: free text), compiled off the event loop and the engine's thread;
    ValueError (→ 400) when it cannot be compiled or xgrammar is not installed."""
    spec = req.spec
    if spec is None:
        return None
    return await run_in_threadpool(lambda: grammars_for(ctx.engine).compile(spec))


def sampling(req: ChatRequest, i: int, grammar: Any = None) -> SamplingParams:
    """Choice i's settings (its seed is the request's + i, so n choices differ and repeat)."""
    return SamplingParams(
        max_tokens=req.budget,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=req.top_p or 1.0,
        top_k=req.top_k_or_off,
        stop=req.stop_list,
        seed=None if req.seed is None else req.seed + i,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        grammar=grammar,
    )


def chat_router(ctx: Serving) -> APIRouter:
    router = APIRouter()
    pieces = Pieces(ctx.engine.processor.tokenizer, ctx.engine.tokenizer_lock)

    @router.post("/v1/chat/completions", responses=POST_ERRORS)
    async def chat(req: ChatRequest, request: Request) -> Response:
        try:
            prompt, parts = build_prompt(req.messages, ctx.forbidden, ctx.engine.processor.config.template)
        except ValueError as e:
            return error(400, str(e))
        try:
            grammar = await compile_grammar(ctx, req)
        except ValueError as e:
            return error(400, str(e), param="response_format" if req.response_format else "structured_outputs")
        if len(parts) > ctx.gate.policy.max_images:  # counted before any fetch or decode
            return error(
                400, f"{len(parts)} images; this server takes at most {ctx.gate.policy.max_images} per request"
            )
        shared = req.mm_processor_kwargs.max_dynamic_patch if req.mm_processor_kwargs else None
        tiles = [ctx.tile_budget(p.max_dynamic_patch or shared) for p in parts]
        try:
            images = await run_in_threadpool(ctx.load_images, [p.url for p in parts], tiles)
        except MediaError as e:
            return error(e.status, str(e), "invalid_image")
        submitted = await submit_all(
            ctx.engine, [(prompt, images, sampling(req, i, grammar), tiles) for i in range(req.n)]
        )
        if isinstance(submitted, Response):
            return submitted
        handles, events = submitted
        rid, name = f"chatcmpl-{uuid.uuid4().hex}", req.model or ctx.model_name
        info = image_info(ctx.engine, handles[0].plans, tiles)
        if req.stream:
            chunks = stream_chunks(
                handles, events, rid, name, info, req.include_usage, pieces if req.logprobs else None
            )
            return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
        done = await collect(request, handles, events)
        if isinstance(done, Response):
            return done
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": h.text},
                "finish_reason": done[i].finish_reason,
                "logprobs": chat_logprobs(h.logprobs, pieces) if req.logprobs else None,
            }
            for i, h in enumerate(handles)
        ]
        body = {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": choices,
            "usage": usage(handles, req.n),
            "nvlm": {"images": info},
        }
        return JSONResponse(body)

    return router
