"""Request schemas of the HTTP API (pydantic v2, hard bounds) and chat messages → NVLM prompt.

Bounds are the first defence against resource abuse (vLLM's unbounded-``n`` OOM, GHSA-3mwp-wvh9-7528): every
number has a range, lists and strings a length. Unknown OpenAI fields are accepted and ignored, except those
that would change how the server renders (``chat_template``, ``chat_template_kwargs``) or that we do not
implement (``tools``, penalties, ``logit_bias``): those get 400 rather than being silently ignored. The tiles
per image may be lowered or raised up to the server's ceiling, per image (``image_url.max_dynamic_patch``, as
LMDeploy takes it) or per request (vLLM's ``mm_processor_kwargs.max_dynamic_patch``); other
``mm_processor_kwargs`` get 400.

Structured outputs (``nvlm.serve.grammar``): OpenAI's ``response_format`` (``json_object``, or ``json_schema``
with ``strict``) or vLLM's ``structured_outputs`` (exactly one of ``json``, ``regex``, ``choice``, ``grammar``,
``json_object``) constrain the answer (their shapes: ``nvlm.serve.formats``); each becomes a ``Spec`` here,
compiled by the route.

Prompt rendering: the model's own template (``nvlm.inference.prompt``: ChatML, or the release's). In a message,
images come first, one ``<image>`` line each, then the text parts joined by newlines, so a one-question request
renders exactly as ``model.chat`` does. A user message may instead place its images itself with exactly one
``<image>`` per image part in its text (the InternVL convention that LMDeploy clients use). Otherwise user text
may not contain the image placeholder, a tile tag, the image markers or any added special token of the tokenizer
(ChatML's ``<|im_start|>`` …): such text is refused with 400, never interpreted.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from nvlm.data.processor import IMAGE_PLACEHOLDER
from nvlm.inference.prompt import render_messages
from nvlm.serve.formats import MAX_GRAMMAR, ResponseFormat, StructuredOutputs, format_spec
from nvlm.serve.grammar import Spec
from nvlm.serve.logprobs import MAX_LOGPROBS

MAX_TEXT = 1_000_000  # characters in one text part
MAX_TOKENS = 1_000_000
REFUSED = {
    "chat_template": "request-supplied chat templates are refused",
    "chat_template_kwargs": "chat_template_kwargs are refused",
    "tools": "tool calling is not supported",
    "functions": "function calling is not supported",
    "frequency_penalty": "penalties are not supported",
    "presence_penalty": "penalties are not supported",
    "repetition_penalty": "penalties are not supported",
    "logit_bias": "logit_bias is not supported",
    "best_of": "best_of is not supported",
    "suffix": "suffix is not supported",
}
NEUTRAL = {"repetition_penalty": 1}  # values of refused fields that change nothing, so they are accepted
Stop = Annotated[str, Field(min_length=1, max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Strict):
    url: str = Field(min_length=1, max_length=64 * 1024 * 1024)
    detail: Literal["auto", "low", "high"] | None = None
    max_dynamic_patch: int | None = Field(default=None, ge=1, le=MAX_TOKENS, description="most tiles for this image")


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


class ProcessorKwargs(BaseModel):
    model_config = ConfigDict(extra="forbid")  # any other preprocessing setting is the server's

    max_dynamic_patch: int | None = Field(default=None, ge=1, le=MAX_TOKENS)


class Sampling(BaseModel):
    """The sampling fields chat and text completions share."""

    model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, metadata, …) are ignored

    model: str | None = Field(default=None, max_length=256)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1, description="sample among the k likeliest; -1, 0: all")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=4)
    stream: bool = False
    stream_options: StreamOptions | None = None
    min_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS, description="no end-of-sequence token before this many")
    ignore_eos: bool = Field(default=False, description="end-of-sequence tokens do not end the answer")
    response_format: ResponseFormat | None = Field(default=None, description="OpenAI's structured outputs")
    structured_outputs: StructuredOutputs | None = Field(default=None, description="vLLM's structured outputs")
    _spec: Spec | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _refuse(self) -> Sampling:
        for key, value in (self.model_extra or {}).items():
            if key in REFUSED and value not in (None, False, 0, 0.0, [], {}, NEUTRAL.get(key)):
                raise ValueError(f"{key}: {REFUSED[key]}")
        if self.min_tokens > self.budget:
            raise ValueError(f"min_tokens ({self.min_tokens}) is over max_tokens ({self.budget})")
        self._spec = self._structure()
        return self

    def _structure(self) -> Spec | None:
        fmt = format_spec(self.response_format)
        if fmt is not None and self.structured_outputs is not None:
            raise ValueError("give response_format or structured_outputs, not both")
        spec = self.structured_outputs.spec() if self.structured_outputs is not None else fmt
        if spec is None:
            return None
        if len(spec.text) > MAX_GRAMMAR:
            raise ValueError(
                f"the {spec.kind} constraint is {len(spec.text)} characters (as JSON); at most {MAX_GRAMMAR}"
            )
        if self.min_tokens or self.ignore_eos:  # the grammar alone decides where the answer may end
            raise ValueError("min_tokens and ignore_eos cannot be combined with structured outputs")
        return spec

    @property
    def spec(self) -> Spec | None:
        """What the answer is constrained to (None: free text)."""
        return self._spec

    @property
    @abstractmethod
    def budget(self) -> int: ...

    @property
    def top_k_or_off(self) -> int:
        return max(self.top_k or 0, 0)  # vLLM's -1 and OpenAI's absent field both mean every token

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    stop: Stop | list[Stop] | None = Field(default=None, max_length=4)
    logprobs: bool = Field(default=False, description="each answer token's log-probability")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="alternatives per token")
    mm_processor_kwargs: ProcessorKwargs | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256

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


def check_text(text: str, forbidden: re.Pattern, where: str) -> None:
    """ValueError (→ 400) naming the first reserved token or tag in `text`."""
    hit = forbidden.search(text)
    if hit:
        raise ValueError(
            f"{where}: text contains the reserved token or tag {hit.group(0)!r}; "
            "images must be sent as image_url parts, and special tokens are not accepted"
        )


def _content(i: int, texts: list[str], n_images: int, forbidden: re.Pattern) -> str:
    """One message's content: its images first, or where its text puts one ``<image>`` per image part."""
    joined = "\n".join(texts)
    if n_images and joined.count(IMAGE_PLACEHOLDER) == n_images:
        for piece in joined.split(IMAGE_PLACEHOLDER):
            check_text(piece, forbidden, f"messages[{i}]")
        return joined
    for text in texts:
        check_text(text, forbidden, f"messages[{i}]")
    return f"{IMAGE_PLACEHOLDER}\n" * n_images + joined


def build_prompt(
    messages: list[Message], forbidden: re.Pattern, template: str = "chatml"
) -> tuple[str, list[ImageURL]]:
    """Messages → (the prompt in the model's `template` with ``<image>`` placeholders, the image parts in order).
    ValueError → 400."""
    rendered, images = [], []
    for i, m in enumerate(messages):
        parts = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
        texts = [p.text for p in parts if isinstance(p, TextPart)]
        mine = [p.image_url for p in parts if isinstance(p, ImagePart)]
        if mine and m.role != "user":
            raise ValueError(f"messages[{i}]: images are accepted in user messages only")
        images += mine
        rendered.append({"role": m.role, "content": _content(i, texts, len(mine), forbidden)})
    if rendered[-1]["role"] == "assistant":
        raise ValueError("the last message must be from the user or the system, not the assistant")
    return render_messages(rendered, template), images
