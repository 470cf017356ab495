"""Response bodies of ``/v1/chat/completions``: usage, the per-image tiling facts, and the SSE stream.

The stream is OpenAI's: one role chunk per choice (the first also carries ``nvlm.images``, the tile grids the
web chat draws), content deltas (with their tokens' ``logprobs`` when asked), a finish chunk per choice, an
optional usage chunk with empty ``choices``, then ``data: [DONE]``. Leaving the generator for any reason (the
client hung up included) cancels the requests, so the engine frees their slots at its next step.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from nvlm.data.layout import describe
from nvlm.serve.logprobs import Pieces, chat_logprobs


def usage(handles: list[Any], n: int = 1) -> dict:
    """Token counts; the prompt of every `n` choices is counted once."""
    prompt = sum(h.prompt_tokens for h in handles[::n])
    completion = sum(len(h.output_ids) for h in handles)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def image_info(engine: Any, plans: list[Any], budgets: list[int]) -> list[dict]:
    """Per image what the model saw (the ``nvlm inspect`` facts): grid, tiles, thumbnail, token counts, and
    ``max_tiles``, the most regular tiles it was allowed (the request's budget, clamped to the server's)."""
    cfg, per_tile = engine.processor.config, engine.processor.tokens_per_tile
    arch = cfg.arch
    out = []
    for plan, budget in zip(plans, budgets, strict=True):
        d = describe(plan, per_tile, cfg.tags.style, cfg.tags.thumbnail_tag)
        out.append(
            {
                "width": d["width"],
                "height": d["height"],
                "tile_size": d["tile_size"],
                "grid": d["grid"],
                "num_tiles": d["num_tiles"],
                "max_tiles": budget,
                "thumbnail": d["thumbnail"],
                "tiles": d["tiles"],
                "arch": arch,
                "tokens": d["tokens"][arch],
                "layout": d["layout"][arch],
            }
        )
    return out


async def stream_chunks(
    handles: list[Any],
    events: asyncio.Queue,
    rid: str,
    name: str,
    info: list[dict],
    include_usage: bool,
    pieces: Pieces | None = None,
) -> Any:
    """SSE chunks: a role chunk per choice, content deltas, a finish chunk, optional usage, then [DONE].
    With `pieces` (logprobs asked) each delta carries the logprobs of the tokens it came from."""
    created = int(time.time())
    sent = [0] * len(handles)  # tokens whose logprobs went out, per choice

    def logprobs(i: int, count: int) -> dict | None:
        if pieces is None:
            return None
        entries, sent[i] = handles[i].logprobs[sent[i] : sent[i] + count], sent[i] + count
        return chat_logprobs(entries, pieces)

    def chunk(choices: list[dict], **extra: Any) -> str:
        body = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        for i in range(len(handles)):
            extra = {"nvlm": {"images": info}} if i == 0 else {}
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], **extra)
        left = len(handles)
        while left:
            i, ev = await events.get()
            if ev.error:
                yield f"data: {json.dumps({'error': {'message': ev.error, 'type': 'server_error'}})}\n\n"
                break
            if ev.text or (pieces is not None and ev.token_ids):
                lp = logprobs(i, len(ev.token_ids))
                yield chunk([{"index": i, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}])
            if ev.finish_reason is not None:
                left -= 1
                yield chunk([{"index": i, "delta": {}, "finish_reason": ev.finish_reason}])
        if include_usage:
            yield chunk([], usage=usage(handles))
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): free the slots within one engine step
        for h in handles:
            h.cancel()
