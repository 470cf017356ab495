"""OpenAI Chat Completions request schema (pydantic v2, hard bounds) and messages → NVLM prompt.

Bounds are the first defence against resource abuse (vLLM's unbounded-``n`` OOM, GHSA-3mwp-wvh9-7528): every
number has a range, lists and strings a length. Unknown OpenAI fields are accepted and ignored, except those
that would change how the server renders or preprocesses (``chat_template``, ``chat_template_kwargs``,
``mm_processor_kwargs``, …) or that we do not implement (``tools``, ``logprobs``, penalties): those get 400
rather than being silently ignored.

Prompt rendering: ChatML, as ``nvlm.data.chat``. In a message, images come first, one ``<image>`` line each,
then the text parts joined by newlines, so a one-question request renders exactly as ``model.chat`` does.
User text may not contain the image placeholder, a tile tag, the image markers or any added special token of
the tokenizer (ChatML's ``<|im_start|>`` …): such text is refused with 400, never interpreted.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nvlm.data.chat import render_chat
from nvlm.data.processor import IMAGE_PLACEHOLDER

MAX_TEXT = 1_000_000  # characters in one text part
REFUSED = {
    "chat_template": "request-supplied chat templates are refused",
    "chat_template_kwargs": "chat_template_kwargs are refused",
    "mm_processor_kwargs": "image preprocessing is set by the server (tiles per image cannot be raised)",
    "tools": "tool calling is not supported",
    "functions": "function calling is not supported",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "frequency_penalty": "penalties are not supported",
    "presence_penalty": "penalties are not supported",
    "logit_bias": "logit_bias is not supported",
    "response_format": "response_format is not supported",
    "min_tokens": "min_tokens is not supported",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Strict):
    url: str = Field(min_length=1, max_length=64 * 1024 * 1024)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT)


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part] | None = Field(default=None, max_length=MAX_TEXT)
    name: str | None = Field(default=None, max_length=64)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, metadata, …) are ignored

    model: str | None = Field(default=None, max_length=256)
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(default=None, max_length=4)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=4)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _refuse(self) -> ChatRequest:
        for key, value in (self.model_extra or {}).items():
            if key in REFUSED and value not in (None, False, 0, 0.0, [], {}):
                raise ValueError(f"{key}: {REFUSED[key]}")
        return self

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


def forbidden_pattern(processor: Any) -> re.Pattern:
    """Strings user text may not contain: the placeholder, tags and markers, every added/special token."""
    tok, tags = processor.tokenizer, processor.config.tags
    words = {IMAGE_PLACEHOLDER, tags.image_pad, tags.image_start, tags.image_end, tags.thumbnail_tag}
    words |= {t for t in getattr(tok, "all_special_tokens", []) if t}
    words |= {t for t in tok.get_added_vocab() if t}
    alts = [re.escape(w) for w in sorted(words, key=len, reverse=True)]
    alts.append(r"<tile_[A-Za-z0-9_]*>")  # every tile tag style's names (<tile_3>, <tile_x1_y0>)
    if tags.style == "2d_bbox":
        alts += [r"<box>", r"</box>"]
    return re.compile("|".join(alts))


def build_prompt(messages: list[Message], forbidden: re.Pattern) -> tuple[str, list[str]]:
    """Messages → (ChatML prompt with ``<image>`` placeholders, image URLs in order). ValueError → 400."""
    rendered, urls = [], []
    for i, m in enumerate(messages):
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
        texts = [p.text for p in parts if isinstance(p, TextPart)]
        images = [p.image_url.url for p in parts if isinstance(p, ImagePart)]
        if images and m.role != "user":
            raise ValueError(f"messages[{i}]: images are accepted in user messages only")
        for text in texts:
            hit = forbidden.search(text)
            if hit:
                raise ValueError(
                    f"messages[{i}]: text contains the reserved token or tag {hit.group(0)!r}; "
                    "images must be sent as image_url parts, and special tokens are not accepted"
                )
        urls += images
        content = f"{IMAGE_PLACEHOLDER}\n" * len(images) + "\n".join(texts)
        rendered.append({"role": m.role, "content": content})
    if rendered[-1]["role"] == "assistant":
        raise ValueError("the last message must be from the user or the system, not the assistant")
    return render_chat(rendered), urls
