"""What a request to the engine is: its sampling settings, the events it yields, its state and errors.

A request is encoded (tiles, tokens) before it is queued; the engine thread then fills in its tokens and calls
``on_event`` (or fills an internal queue that ``iter(request)`` / ``request.result()`` read) once per step.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from nvlm.inference.generate import _Detok


class EngineError(RuntimeError):
    """The engine cannot take this request now (the server answers 503)."""


class QueueFull(EngineError):
    """The bounded queue is full: refuse at once rather than wait without bound."""


class EngineUnavailable(EngineError):
    """The engine is shutting down, dead or wedged."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


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
    detok: _Detok
    on_event: Any = None  # callable(Event), called on the engine thread; default: an internal queue
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False
    sent: int = 0
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_last: float | None = None

    def __post_init__(self) -> None:
        self._events: queue.Queue[Event] = queue.Queue()
        seed = self.params.seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    @property
    def prompt_tokens(self) -> int:
        return len(self.encoded.input_ids)

    @property
    def text(self) -> str:
        return self.detok.texts[0]

    @property
    def plans(self) -> list[Any]:
        return self.encoded.plans

    def cancel(self) -> None:
        """Stop generating: the engine frees this request's slot at its next step."""
        self.cancelled = True

    def emit(self, event: Event) -> None:
        (self.on_event or self._events.put)(event)

    def __iter__(self) -> Iterator[Event]:
        """Events until the request finishes (blocking; only without an `on_event` callback)."""
        while True:
            event = self._events.get(timeout=600)
            yield event
            if event.finish_reason is not None:
                return

    def result(self) -> str:
        for event in self:
            if event.error:
                raise EngineError(event.error)
        return self.text
