"""The OpenAI-compatible HTTP API over the engine (FastAPI): chat completions (plain and SSE), models, health,
metrics, and the web chat page at ``/``.

Errors always carry OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request
(schema bounds, reserved tokens, refused or unreadable images), 401 without the API key, 413 for a body or
image over the limit, 503 when the queue is full or the engine is not serving (at once, with Retry-After).
The request body limit, the API key (compared in constant time) and the status counters live in one small
ASGI middleware, so they hold for every route, including ones FastAPI answers itself (404, 405).
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import MutableMapping
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from nvlm.serve.engine import Engine, EngineError, Event, SamplingParams
from nvlm.serve.media import MediaError, MediaGate
from nvlm.serve.protocol import ChatRequest, build_prompt, forbidden_pattern
from nvlm.serve.responses import image_info, stream_chunks, usage

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


class _Guard:
    """ASGI middleware: optional bearer key (401), Content-Length over the limit (413), status counters.
    A chunked body without Content-Length is counted while read (``_read_body``)."""

    OPEN = ("/", "/health", "/favicon.ico")  # the page asks for the key itself; health is for probes

    def __init__(self, app: Any, max_body: int, api_key: str | None, metrics: Any) -> None:
        self.app, self.max_body, self.api_key, self.metrics = app, max_body, api_key, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])

        async def count(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.metrics.status(message["status"])
            await send(message)

        if self.api_key and scope["path"] not in self.OPEN:
            given = headers.get(b"authorization", b"").decode("latin-1").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return await error(401, "missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key")(
                    scope, receive, count
                )
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:  # refused before reading any of it
            return await error(413, f"request body over {self.max_body:,} bytes", "request_too_large")(
                scope, receive, count
            )
        await self.app(scope, receive, count)


def create_app(
    engine: Engine,
    gate: MediaGate | None = None,
    *,
    model_name: str = "nvlm",
    api_key: str | None = None,
    max_body_bytes: int = 64 * 1024 * 1024,
) -> FastAPI:
    """The FastAPI app. The engine is started here if it is not yet, and drained at shutdown."""
    gate = gate or MediaGate()
    forbidden = forbidden_pattern(engine.processor)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine._thread is None:
            engine.start()
        yield
        await run_in_threadpool(engine.close, True, 30.0)  # SIGTERM: uvicorn stopped accepting; finish in-flight

    app = FastAPI(title="nvlm serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_Guard, max_body=max_body_bytes, api_key=api_key, metrics=engine.metrics)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, str(exc.errors()[:3]))

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"}) if engine.healthy else error(503, "engine not serving")

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "nvlm"}],
        }

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = engine.metrics.render(engine.in_flight, engine.queue_depth, len(engine._running))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("nvlm.serve").joinpath("static/index.html").read_text("utf-8"))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        try:
            body = await _read_body(request, max_body_bytes)
            if body is None:
                return error(413, f"request body over {max_body_bytes:,} bytes", "request_too_large")
            req = ChatRequest.model_validate_json(body)
            prompt, urls = build_prompt(req.messages, forbidden)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            return error(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")), param=where or None)
        except ValueError as e:
            return error(400, str(e))
        if len(urls) > gate.policy.max_images:  # counted before any fetch or decode
            return error(400, f"{len(urls)} images; this server takes at most {gate.policy.max_images} per request")
        try:
            images = await run_in_threadpool(gate.load_all, urls)
        except MediaError as e:
            return error(e.status, str(e), "invalid_image")
        loop, events = asyncio.get_running_loop(), asyncio.Queue[Any]()
        handles = []
        try:
            for i in range(req.n):
                params = SamplingParams(
                    max_tokens=req.max_completion_tokens or req.max_tokens or 256,
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=req.top_p or 1.0,
                    stop=req.stop_list,
                    seed=None if req.seed is None else req.seed + i,
                )
                handles.append(await run_in_threadpool(engine.submit, prompt, images, params, _sink(loop, events, i)))
        except (ValueError, EngineError) as e:
            for h in handles:
                h.cancel()
            return error(503 if isinstance(e, EngineError) else 400, str(e))
        rid, name = f"chatcmpl-{uuid.uuid4().hex}", req.model or model_name
        info = image_info(engine, handles[0].plans)
        if req.stream:
            with_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                stream_chunks(handles, events, rid, name, info, with_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
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
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": h.text},
                "finish_reason": done[i].finish_reason,
                "logprobs": None,
            }
            for i, h in enumerate(handles)
        ]
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": name,
                "choices": choices,
                "usage": usage(handles),
                "nvlm": {"images": info},
            }
        )

    return app


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it grows past `limit` (nothing more is buffered)."""
    chunks, seen = [], 0
    async for piece in request.stream():
        seen += len(piece)
        if seen > limit:
            return None
        chunks.append(piece)
    return b"".join(chunks)


def _sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int) -> Any:
    def put(ev: Event) -> None:  # runs on the engine thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, (index, ev))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    return put
