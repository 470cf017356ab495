"""``POST /v1/completions``: OpenAI's (legacy) text completions, the route log-likelihood evaluation needs.

A prompt is text or token ids, or a list of either (choice ``k`` belongs to prompt ``k // n``). With ``echo``
the prompt comes back in front of the answer, and with ``logprobs`` (0–20 alternatives) so do its tokens'
log-probabilities: ``{prompt, max_tokens: 1, logprobs: 1, echo: true}`` is how lm-evaluation-harness scores a
continuation, and ``max_tokens: 0`` with ``echo`` scores the prompt alone. Log-probabilities are the model's
own (``nvlm.serve.logprobs``). Prompt text is refused if it holds a reserved token, as chat text is; token-id
prompts are range-checked and may not hold the image-pad token (this route takes no images). Structured outputs
(``response_format``, ``structured_outputs``) constrain every choice as in chat (the echoed prompt is not part
of what they constrain).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field, model_validator

from nvlm.serve.chat_routes import SSE_HEADERS, compile_grammar
from nvlm.serve.common import POST_ERRORS, Serving, collect, error, submit_all
from nvlm.serve.engine import SamplingParams
from nvlm.serve.logprobs import MAX_LOGPROBS, Pieces, completion_logprobs
from nvlm.serve.protocol import MAX_TEXT, MAX_TOKENS, Sampling, Stop, check_text
from nvlm.serve.responses import usage

Text = Annotated[str, Field(max_length=MAX_TEXT)]
Ids = Annotated[list[int], Field(max_length=MAX_TOKENS)]


class CompletionRequest(Sampling):
    prompt: Text | Annotated[list[Text], Field(max_length=64)] | Ids | Annotated[list[Ids], Field(max_length=64)]
    max_tokens: int = Field(default=16, ge=0, le=MAX_TOKENS, description="0 with echo: score the prompt only")
    echo: bool = Field(default=False, description="return the prompt in front of the completion")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="alternatives per token")
    stop: Stop | list[Stop] | None = Field(default=None, max_length=16)

    @model_validator(mode="after")
    def _some_prompt(self) -> CompletionRequest:
        if not self.prompts or any(len(p) == 0 for p in self.prompts):
            raise ValueError("prompt: empty; give text, token ids, or a list of either")
        return self

    @property
    def budget(self) -> int:
        return self.max_tokens

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    def sampling(self, k: int, grammar: Any = None) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p or 1.0,
            top_k=self.top_k_or_off,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            seed=None if self.seed is None else self.seed + k,
            logprobs=self.logprobs,
            prompt_logprobs=self.logprobs if self.echo else None,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            grammar=grammar,
        )


def completions_router(ctx: Serving) -> APIRouter:
    router = APIRouter()
    tok, lock = ctx.engine.processor.tokenizer, ctx.engine.tokenizer_lock
    pieces = Pieces(tok, lock)

    def prompt_text(prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        with lock:
            return tok.decode(prompt)

    @router.post("/v1/completions", responses=POST_ERRORS)
    async def completions(req: CompletionRequest, request: Request) -> Response:
        prompts, n = req.prompts, req.n
        try:
            for j, p in enumerate(prompts):
                if isinstance(p, str):
                    check_text(p, ctx.forbidden, f"prompt[{j}]")
            grammar = await compile_grammar(ctx, req)
        except ValueError as e:
            return error(400, str(e))
        each = [p for p in prompts for _ in range(n)]  # choice k answers prompt k // n
        jobs: list[tuple[Any, list, SamplingParams, Any]] = [
            (p, [], req.sampling(k, grammar), None) for k, p in enumerate(each)
        ]
        submitted = await submit_all(ctx.engine, jobs)
        if isinstance(submitted, Response):
            return submitted
        handles, events = submitted
        rid, name = f"cmpl-{uuid.uuid4().hex}", req.model or ctx.model_name
        echoes = [prompt_text(prompts[k // n]) if req.echo else "" for k in range(len(handles))]
        if req.stream:
            chunks = _stream(handles, events, rid, name, req, echoes, pieces)
            return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
        done = await collect(request, handles, events)
        if isinstance(done, Response):
            return done
        choices = []
        for k, h in enumerate(handles):
            lp = None
            if req.logprobs is not None:
                ids, entries = list(h.output_ids), list(h.logprobs)
                if req.echo:
                    ids, entries = h.encoded.input_ids + ids, (h.prompt_logprobs or []) + entries
                lp = completion_logprobs(entries, ids, pieces)
            text = echoes[k] + h.text
            choices.append({"index": k, "text": text, "logprobs": lp, "finish_reason": done[k].finish_reason})
        body = {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": choices,
            "usage": usage(handles, n),
        }
        return JSONResponse(body)

    return router


async def _stream(
    handles: list[Any],
    events: asyncio.Queue,
    rid: str,
    name: str,
    req: CompletionRequest,
    echoes: list[str],
    pieces: Pieces,
) -> Any:
    """SSE chunks per choice: the echoed prompt (once its prefill has scored it), text deltas with their tokens'
    logprobs, a finish chunk; then an optional usage chunk with empty ``choices``, and ``data: [DONE]``."""
    created, count = int(time.time()), len(handles)
    sent, offset, started = [0] * count, [0] * count, [False] * count

    def chunk(choices: list[dict], **extra: Any) -> str:
        body = {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": choices}
        return f"data: {json.dumps({**body, **extra}, ensure_ascii=False)}\n\n"

    def piece(k: int, text: str, ids: list[int], entries: list[Any]) -> str:
        lp = None
        if req.logprobs is not None:
            lp = completion_logprobs(entries, ids, pieces, offset[k])
            offset[k] += sum(len(t) for t in lp["tokens"])
        return chunk([{"index": k, "text": text, "logprobs": lp, "finish_reason": None}])

    try:
        left = count
        while left:
            k, ev = await events.get()
            h = handles[k]
            if ev.error:
                yield f"data: {json.dumps({'error': {'message': ev.error, 'type': 'server_error'}})}\n\n"
                break
            if req.echo and not started[k]:
                yield piece(k, echoes[k], h.encoded.input_ids, h.prompt_logprobs or [])
            started[k] = True
            c = len(ev.token_ids)
            if ev.text or (c and req.logprobs is not None):
                yield piece(k, ev.text, h.output_ids[sent[k] : sent[k] + c], h.logprobs[sent[k] : sent[k] + c])
            sent[k] += c
            if ev.finish_reason is not None:
                left -= 1
                yield chunk([{"index": k, "text": "", "logprobs": None, "finish_reason": ev.finish_reason}])
        if req.include_usage:
            yield chunk([], usage=usage(handles, req.n))
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): free the slots within one engine step
        for h in handles:
            h.cancel()
