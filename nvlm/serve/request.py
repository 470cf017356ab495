"""What a request to the engine is: its sampling settings, the events it yields, its state and errors.

A request is encoded (tiles, tokens) before it is queued; the engine thread then fills in its tokens and calls
``on_event`` (or fills an internal queue that ``iter(request)`` / ``request.result()`` read) once per step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from nvlm.data.processor import Encoded
from nvlm.inference.detok import Detokenizer
from nvlm.serve.grammar import Matcher


class EngineError(RuntimeError):
    """The engine cannot take this request now (the server answers 503)."""


class QueueFull(EngineError):
    """The bounded queue is full: refuse at once rather than wait without bound."""


class EngineUnavailable(EngineError):
    """The engine is shutting down, dead or wedged."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64  # 0: no new token (with prompt_logprobs: score the prompt only)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # each new token's log-probability and this many top alternatives; None: off
    prompt_logprobs: int | None = None  # the same for every prompt token after the first; None: off
    min_tokens: int = 0  # end-of-sequence tokens cannot be drawn before this many new tokens
    ignore_eos: bool = False  # end-of-sequence tokens do not end the request (stop strings and max_tokens do)
    grammar: Any = None  # a compiled grammar the answer must match (``nvlm.serve.grammar``); None: free text


@dataclass(frozen=True)
class TokenLogprob:
    """One position's token, its log-probability under the model, and the `top` most likely (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What one step produced for one request: final text since the last event (stop strings held back)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None


@dataclass(eq=False)
class Request:
    encoded: Any  # nvlm.data.processor.Encoded
    params: SamplingParams
    detok: Detokenizer
    on_event: Any = None  # callable(Event), called on the engine thread; default: an internal queue
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output id, when params.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt id (None for the first)
    finish_reason: str | None = None
    cancelled: bool = False
    sent: int = 0
    t_submit: float = field(default_factory=time.perf_counter)
    image_keys: list[tuple[str, int]] = field(default_factory=list)  # (content key, tiles) per image
    block_hashes: list[bytes] = field(default_factory=list)  # the prompt's full blocks (prefix cache)
    t_admit: float = 0.0  # when last admitted to a prefill (preemption takes the newest rows first)
    t_first: float | None = None
    t_last: float | None = None

    def __post_init__(self) -> None:
        self._events: queue.Queue[Event] = queue.Queue()
        self._final: Event | None = None
        self._done = threading.Event()  # what `result` waits on: one wake-up at the end, not one per token
        self._generator: torch.Generator | None = None
        # its own grammar state, made on the submitting thread; it survives a preemption with the output ids
        self.matcher = Matcher(self.params.grammar) if self.params.grammar is not None else None

    def generator(self, device: torch.device) -> torch.Generator | None:
        """This request's own random stream, on the device its logits are on (None: the global stream)."""
        if self.params.seed is not None and self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self.params.seed)
        return self._generator

    def to_prefill(self) -> Encoded:
        """What a prefill of this request computes: the prompt, and after a preemption also the tokens generated
        so far (each sees the sample's whole image memory, as a decoding step does)."""
        e, out = self.encoded, self.output_ids
        if not out:
            return e
        return replace(
            e,
            input_ids=e.input_ids + out,
            xattn_lo=e.xattn_lo + [0] * len(out),
            xattn_hi=e.xattn_hi + [e.memory_len] * len(out),
            labels=[],
        )

    @property
    def prompt_tokens(self) -> int:
        return len(self.encoded.input_ids)

    @property
    def text(self) -> str:
        return self.detok.text

    @property
    def plans(self) -> list[Any]:
        return self.encoded.plans

    def cancel(self) -> None:
        """Stop generating: the engine frees this request's slot at its next step."""
        self.cancelled = True

    def emit(self, event: Event) -> None:
        (self.on_event or self._events.put)(event)
        if event.finish_reason is not None:
            self._final = event
            self._done.set()

    def __iter__(self) -> Iterator[Event]:
        """Events until the request finishes (blocking; only without an `on_event` callback)."""
        while True:
            event = self._events.get(timeout=600)
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float = 600) -> str:
        """The whole answer, once the request has finished (blocking); EngineError if it failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the request did not finish within {timeout} s")
        assert self._final is not None
        if self._final.error:
            raise EngineError(self._final.error)
        return self.text


def encode_ids(processor: Any, ids: list[int]) -> Any:
    """A prompt given as token ids (no images) → an ``Encoded`` sample; ValueError for an id out of the
    tokenizer's range or the image-pad id, which only an image's tiles may fill."""
    vocab = len(processor.tokenizer)
    if not ids:
        raise ValueError("prompt: token-id prompt is empty")
    for i, t in enumerate(ids):
        if not 0 <= t < vocab:
            raise ValueError(f"prompt: token id {t} at position {i} is outside the tokenizer's range [0, {vocab})")
        if t == processor.pad_id:
            raise ValueError(
                f"prompt: token id {t} at position {i} is the image-pad token; send images through the chat route"
            )
    n = len(ids)
    return Encoded(list(ids), None, [], [], 0, [0] * n, [0] * n)
