"""Helpers shared by the serve tests: a served tiny model, image data URLs, bounded waits."""

from __future__ import annotations

import base64
import io
import time
from contextlib import contextmanager

from conftest import set_gates

from nvlm.serve.app import create_app
from nvlm.serve.engine import Engine
from nvlm.serve.media import MediaGate, MediaPolicy
from nvlm.serve.server import BackgroundServer


def data_url(image, fmt: str = "PNG", mime: str | None = None) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:{mime or 'image/' + fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def raw_data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@contextmanager
def served(built, policy: MediaPolicy | None = None, gates: float | None = 0.5, **kw):
    """(url, engine) of `built` (model, processor) behind the HTTP API on 127.0.0.1; engine options and app
    options in `kw`."""
    model, processor = built
    if gates is not None and model.xattn:
        set_gates(model, gates)
    eng_kw = {k: kw.pop(k) for k in ("max_batch", "max_queue", "stall_s", "encoder_cache_gb") if k in kw}
    keep_alive = kw.pop("timeout_keep_alive", 5)
    engine = Engine(model, processor, **eng_kw)
    app = create_app(engine, MediaGate(policy or MediaPolicy()), **kw)
    with BackgroundServer(app, timeout_keep_alive=keep_alive) as url:
        yield url, engine


def wait_for(cond, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def user(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]
