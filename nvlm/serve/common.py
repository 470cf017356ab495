"""What every route of the HTTP API shares: OpenAI's error body, the serving context (engine, media gate, names,
tile budget), submitting a request's choices to the engine and waiting for them.

Errors always carry OpenAI's body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from nvlm.data.processor import TiledImage
from nvlm.serve.engine import Engine, EngineError, Event, SamplingParams
from nvlm.serve.media import MediaGate

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable_error",
}


def error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error body, documented in /openapi.json for every status the API answers with it."""

    error: ErrorDetail


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: each status with OpenAI's error body (clients read them in /openapi.json)."""
    return {s: {"model": ErrorBody, "description": _TYPES.get(s, "server_error")} for s in statuses}


# every POST route: bad request, API key, body over the limit, generation failed, engine not serving
POST_ERRORS = documented(400, 401, 413, 500, 503)


@dataclass
class Serving:
    """What the routes serve: the engine, the media gate, the served model's name and the text it refuses."""

    engine: Engine
    gate: MediaGate
    model_name: str
    forbidden: re.Pattern

    def __post_init__(self) -> None:
        ceiling = self.gate.policy.max_tiles
        if ceiling is not None:  # the processor's check: the tiler's ceiling, and tile tags that exist as tokens
            try:
                self.engine.processor.tile_budgets(ceiling, 1)
            except ValueError as e:
                raise ValueError(f"--max-tiles {ceiling}: {e}") from None

    @property
    def max_tiles(self) -> int:
        """The most regular tiles per image a request may ask for: the gate's ceiling, else the model's own."""
        return self.gate.policy.max_tiles or self.engine.processor.config.tiling.max_tiles

    def load_images(self, urls: list[str], budgets: list[int]) -> list[TiledImage]:
        """Each image URL fetched and checked, then decoded and tiled for its budget; bytes the encoder cache has
        seen with the same budget are neither decoded nor tiled again. MediaError for a bad image. (The route has
        counted the images against ``max_images`` before any fetch.)"""
        cache, processor = self.engine.encoder_cache, self.engine.processor
        out = []
        for url, top in zip(urls, budgets, strict=True):
            data = self.gate.fetch(url)

            def make(data: bytes = data, top: int = top) -> TiledImage:
                return processor.tile(self.gate.decode(data), top)

            out.append(cache.tiled(data, top, make) if cache is not None else make())
        return out

    def tile_budget(self, requested: int | None) -> int:
        """Tiles for one image: what the request asked (clamped to the ceiling), else the model's setting."""
        own = self.engine.processor.config.tiling.max_tiles
        return min(requested or own, self.max_tiles)


class Mailbox:
    """Events from the engine thread to one event loop, delivered in batches.

    The engine emits an event per row per step; waking the loop for each (``call_soon_threadsafe`` writes to its
    self-pipe) cost a system call per row and token on the engine's thread (12 % of its time at 16 rows, in a
    profile). Here events are appended under a lock and the loop is woken once for all that arrived since it
    last drained them, in their order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Any]] = []

    def post(self, queue: asyncio.Queue, item: Any) -> None:  # runs on the engine thread
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:  # a wake-up is already on its way
                return
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    def _drain(self) -> None:  # runs on the loop
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()


def sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int) -> Any:
    """An engine callback that hands (choice index, event) to the event loop's queue (through its mailbox)."""
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = Mailbox(loop)

    def put(ev: Event) -> None:  # runs on the engine thread
        box.post(events, (index, ev))

    return put


async def submit_all(
    engine: Engine, jobs: list[tuple[Any, list, SamplingParams, Any]]
) -> tuple[list[Any], asyncio.Queue] | Response:
    """Queue each (prompt, images, params, max_tiles) as one choice; all of them, or none and an error (400/503)."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue[Any]()
    handles: list[Any] = []
    try:
        for i, (prompt, images, params, tiles) in enumerate(jobs):
            handles.append(await run_in_threadpool(engine.submit, prompt, images, params, sink(loop, events, i), tiles))
    except (ValueError, EngineError) as e:
        for h in handles:
            h.cancel()
        return error(503 if isinstance(e, EngineError) else 400, str(e))
    return handles, events


async def collect(request: Request, handles: list[Any], events: asyncio.Queue) -> dict[int, Event] | Response:
    """Each choice's final event; 499 if the client hangs up first (its rows are freed), 500 if one failed."""
    done: dict[int, Event] = {}
    try:
        while len(done) < len(handles):
            try:
                i, ev = await asyncio.wait_for(events.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)
                continue
            if ev.finish_reason is not None:
                done[i] = ev
    finally:
        for h in handles:
            h.cancel()  # no-op for finished ones; frees the slots of a disconnected client
    failed = [ev.error for ev in done.values() if ev.error]
    if failed:
        return error(500, f"generation failed: {failed[0]}")
    return done
