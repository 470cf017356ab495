"""Predictions from any OpenAI-compatible server (ours, vLLM, SGLang) for ``nvlm eval run --server URL``.

``ServerModel`` stands in for an NVLM model where the eval runner calls ``model.generate(prompts, images,
max_new_tokens=…, stop=…)``: each prompt (ChatML with ``<image>`` placeholders, as ``nvlm.eval`` renders it,
or raw text) becomes chat messages with the images as PNG ``data:`` URLs, and is sent to
``/v1/chat/completions`` (greedy, ``concurrency`` requests at a time). It is not callable, so the runner
takes the generation path for every task (no next-token log-probs over HTTP).
"""

from __future__ import annotations

import base64
import io
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nvlm.data.chat import IM_END, IM_START
from nvlm.data.processor import IMAGE_PLACEHOLDER

_TURN = re.compile(re.escape(IM_START) + r"(system|user|assistant)\n(.*?)" + re.escape(IM_END) + r"\n?", re.DOTALL)


def chatml_to_messages(prompt: str) -> list[dict[str, str]]:
    """ChatML (``render_chat`` output, generation prompt included or not) → [{"role", "content"}]; a prompt
    without ChatML turns is one user message."""
    turns = [{"role": r, "content": c} for r, c in _TURN.findall(prompt)]
    rest = _TURN.sub("", prompt).removesuffix(f"{IM_START}assistant\n")
    if not turns:
        return [{"role": "user", "content": prompt}]
    if rest.strip():
        raise ValueError(f"prompt has text outside ChatML turns: {rest[:100]!r}")
    return turns


def _data_url(image: Any) -> str:
    from PIL import Image

    from nvlm.vision.image_io import load_image

    im = image if isinstance(image, Image.Image) else load_image(image)
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def to_openai_messages(prompt: str, images: list[Any]) -> list[dict]:
    """Placeholders become ``image_url`` parts (images in order), put before the message's text, which is
    how the server renders them back."""
    images = list(images)
    out: list[dict[str, Any]] = []
    for m in chatml_to_messages(prompt):
        n = m["content"].count(IMAGE_PLACEHOLDER)
        if n == 0:
            out.append(m)
            continue
        if n > len(images):
            raise ValueError(f"prompt has more {IMAGE_PLACEHOLDER} placeholders than images")
        text = m["content"].replace(f"{IMAGE_PLACEHOLDER}\n", "").replace(IMAGE_PLACEHOLDER, "")
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": _data_url(im)}} for im in images[:n]]
        images = images[n:]
        out.append({"role": m["role"], "content": parts + [{"type": "text", "text": text}]})
    if images:
        raise ValueError(f"{len(images)} image(s) without a {IMAGE_PLACEHOLDER} placeholder")
    return out


class ServerModel:
    """``generate`` over HTTP; `url` is the server's base (``http://host:port`` or ``…/v1``)."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 600.0,
    ) -> None:
        import httpx

        self.base = url.rstrip("/").removesuffix("/v1") + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self.concurrency = concurrency
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        r = self.client.get(self.base + "/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]

    def eval(self) -> ServerModel:
        return self

    def __repr__(self) -> str:
        return f"server:{self.base}#{self.model}"

    @property
    def name_or_path(self) -> str:  # what the eval runner records as the model in run.json
        return repr(self)

    def generate(
        self,
        prompts: str | list[str],
        images: list | None = None,
        *,
        max_new_tokens: int = 64,
        stop: list[str] | None = None,
        **_: Any,
    ) -> str | list[str]:
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        image_lists = [images or []] if single else (images or [[] for _ in texts])
        with ThreadPoolExecutor(self.concurrency) as pool:
            out = list(
                pool.map(lambda a: self._one(a[0], a[1], max_new_tokens, stop), zip(texts, image_lists, strict=True))
            )
        return out[0] if single else out

    def _one(self, prompt: str, images: list[Any], max_tokens: int, stop: list[str] | None) -> str:
        body = {
            "model": self.model,
            "messages": to_openai_messages(prompt, images),
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if stop:
            body["stop"] = list(stop)[:4]
        r = self.client.post(self.base + "/chat/completions", json=body)
        if r.status_code != 200:
            try:
                why = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                why = r.text[:300]
            raise RuntimeError(f"{self.base}: HTTP {r.status_code}: {why}")
        return r.json()["choices"][0]["message"]["content"] or ""
