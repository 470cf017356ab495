"""The OpenAI-compatible HTTP API over the engine (FastAPI): chat and text completions (plain and SSE), the
tokenizer routes, models, health, metrics, and the web chat page at ``/``.

Errors always carry OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request
(schema bounds, reserved tokens, refused or unreadable images), 401 without the API key, 413 for a body or
image over the limit, 503 when the queue is full or the engine is not serving (at once, with Retry-After).
The request body limit, the API key (compared in constant time) and the status counters live in one small
ASGI middleware, so they hold for every route, including ones FastAPI answers itself (404, 405). Request
bodies are pydantic models (``nvlm.serve.protocol``, ``nvlm.serve.completions``), so ``/openapi.json``
describes what each route validates.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import MutableMapping
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from nvlm.serve.chat_routes import chat_router
from nvlm.serve.common import Serving, documented, error
from nvlm.serve.completions import completions_router
from nvlm.serve.engine import Engine
from nvlm.serve.media import MediaGate
from nvlm.serve.protocol import forbidden_pattern
from nvlm.serve.tokenize_routes import tokenize_router


class _Guard:
    """ASGI middleware: optional bearer key (401), a body over the limit (413: judged from Content-Length
    before reading; a chunked body is read here, up to the limit, and handed on), status counters."""

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
        too_large = error(413, f"request body over {self.max_body:,} bytes", "request_too_large")
        if length.isdigit() and int(length) > self.max_body:  # refused before reading any of it
            return await too_large(scope, receive, count)
        if not length.isdigit() and scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await _read_body(receive, self.max_body)
            if body is None:
                return await too_large(scope, receive, count)
            receive = _replay(body, receive)
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
    ctx = Serving(engine, gate or MediaGate(), model_name, forbidden_pattern(engine.processor))
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
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ())]
        where = ".".join(loc[1:] if loc[:1] == ["body"] else loc)
        msg = str(first.get("msg", "invalid request"))
        return error(400, f"{where}: {msg}" if where else msg, param=where or None)

    @app.get("/health", responses=documented(503))
    async def health() -> Response:
        return JSONResponse({"status": "ok"}) if engine.healthy else error(503, "engine not serving")

    @app.get("/v1/models", responses=documented(401))
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "nvlm"}],
        }

    @app.get("/metrics", response_class=PlainTextResponse, responses=documented(401))
    async def metrics() -> PlainTextResponse:
        text = engine.metrics.render(engine.in_flight, engine.queue_depth, len(engine._running))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("nvlm.serve").joinpath("static/index.html").read_text("utf-8"))

    for router in (chat_router(ctx), completions_router(ctx), tokenize_router(ctx)):
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        # a request the schema rejects is answered 400 with OpenAI's error body (validation_error above), as
        # OpenAI answers it, never FastAPI's 422: the document says what clients get
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The whole body, or None as soon as it grows past `limit` (nothing more is buffered)."""
    chunks, seen, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            break
        piece = message.get("body", b"")
        seen += len(piece)
        if seen > limit:
            return None
        chunks.append(piece)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that hands the app the body read already, then waits on the connection as before."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Any:
        return pending.pop() if pending else await receive()

    return replayed
