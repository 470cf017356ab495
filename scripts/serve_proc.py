"""``nvlm serve`` as a child process on 127.0.0.1 for the scripts that drive outside clients against it; with
``--record FILE`` each request body the clients send is written to FILE (one JSON object a line), which is how
the fixtures under tests/fixtures/clients/ are recorded.

python scripts/serve_proc.py MODEL [--port 8000] [--name nvlm-d] [--record requests.jsonl] [-- serve args...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


@contextlib.contextmanager
def served(model: str, port: int, name: str, extra: list[str] | None = None) -> Iterator[str]:
    """Start ``nvlm serve``, wait until ``/v1/models`` answers, yield the base URL, stop it on exit."""
    cmd = ["nvlm", "serve", model, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", name]
    proc = subprocess.Popen([*cmd, *(extra or [])])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit(f"nvlm serve exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        else:
            raise SystemExit("nvlm serve did not answer /v1/models in 10 minutes")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def recording_proxy(upstream: str, record: Path, port: int) -> None:
    """Forward every request to `upstream` (streamed answers stream through) and append its method, path and
    JSON body to `record`."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient(base_url=upstream, timeout=600)

    async def forward(request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw) if raw else None
        with open(record, "a") as f:
            f.write(json.dumps({"method": request.method, "path": request.url.path, "body": body}) + "\n")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        req = client.build_request(request.method, request.url.path, content=raw, headers=headers)
        resp = await client.send(req, stream=True)
        keep = {k: v for k, v in resp.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        return StreamingResponse(resp.aiter_raw(), resp.status_code, keep, background=None)

    methods = ["GET", "POST", "PUT", "DELETE"]
    app = Starlette(routes=[Route("/{path:path}", forward, methods=methods)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--port", type=int, default=8000, help="where clients connect")
    ap.add_argument("--name", default="nvlm-d", help="--served-model-name")
    ap.add_argument("--record", type=Path, help="record request bodies here (the server then listens on port+1)")
    a, extra = ap.parse_known_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that the server child is stopped too
    extra = [x for x in extra if x != "--"]
    with served(a.model, a.port + 1 if a.record else a.port, a.name, extra) as url:
        print(f"serving {a.name} at {url}", file=sys.stderr, flush=True)
        if a.record:
            recording_proxy(url, a.record, a.port)
        else:
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)


if __name__ == "__main__":
    main()
