"""The serving engine: continuous batching for NVLM-D, -X and -H, usable without HTTP.

    engine = Engine(model, processor, max_batch=16, max_queue=64).start()
    req = engine.submit(chat_prompt("What is this?", 1), [image], SamplingParams(max_tokens=64))
    text = req.result()            # or: for event in req: print(event.text, end="")

One worker thread owns the model. Each step it (1) drops cancelled rows, (2) prefills the waiting requests that
fit (free slots, a prompt-token budget) as one left-padded batch, so the image path (tiles → vision tower →
projector) runs once per image and X/H blocks compute each image's K/V once, (3) joins them to the running
batch and (4) decodes one token for every running row. Rows leave as soon as they finish; nobody waits for
the slowest request of a static batch. Sampling, stop strings and detokenisation are ``generate``'s own
(``sample_next``, ``_Detok``), per request, so greedy output equals ``model.generate`` for every request and a
seeded sampled request draws the same tokens as ``model.generate(..., seed=s)`` alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import torch

from nvlm.data.processor import Processor
from nvlm.inference.generate import _Detok, _stop_ids, sample_next
from nvlm.serve.batch import RunningBatch
from nvlm.serve.logprobs import prompt_logprobs, step_logprobs
from nvlm.serve.metrics import EngineMetrics
from nvlm.serve.request import (
    EngineError,
    EngineUnavailable,
    Event,
    QueueFull,
    Request,
    SamplingParams,
    encode_ids,
)

__all__ = ["Engine", "EngineError", "EngineUnavailable", "Event", "QueueFull", "Request", "SamplingParams"]

log = logging.getLogger("nvlm.serve")


class Engine:
    """Continuous-batching generation over one NVLM model (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        processor: Processor,
        max_batch: int = 16,
        max_queue: int = 64,
        max_prefill_tokens: int = 16384,
        stall_s: float = 120.0,
        metrics: EngineMetrics | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.model, self.processor = model, processor
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        self.max_len = int(getattr(model.llm.config, "max_position_embeddings", 0) or 1 << 30)
        self.stall_s = stall_s
        self.stop_ids = _stop_ids(processor.tokenizer)
        self.metrics = metrics or EngineMetrics()
        self._cond = threading.Condition()
        self._tok_lock = threading.Lock()  # one user of the tokenizer at a time (submit threads, the worker)
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._admitted = 0  # taken from the queue, being prefilled: they hold slots already
        self._batch = RunningBatch()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._beat = time.monotonic()  # last sign of life of the worker; a stale one means wedged
        self.fault: str | None = None  # test hook: "die" ends the worker at its next step

    # ---- public --------------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="nvlm-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def healthy(self) -> bool:
        """True only while the worker runs and has shown life within `stall_s`."""
        alive = self._thread is not None and self._thread.is_alive()
        return alive and not self._closing and time.monotonic() - self._beat < self.stall_s

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        return len(self._waiting) + self._admitted + len(self._running)

    @property
    def tokenizer_lock(self) -> threading.Lock:
        """Held by whoever uses the tokenizer (fast tokenizers refuse concurrent use)."""
        return self._tok_lock

    def submit(
        self,
        prompt: str | list[int],
        images: list[Any] | None = None,
        params: SamplingParams | None = None,
        on_event: Any = None,
        max_tiles: int | list[int] | None = None,
    ) -> Request:
        """Encode (tiles, tokens) here on the caller's thread, then queue. `prompt` is text with ``<image>``
        placeholders, or token ids (no images); `max_tiles` overrides the tiles per image (one, or one per
        image). Raises ValueError for a bad request (the server's 400), QueueFull / EngineUnavailable (503)."""
        params = params or SamplingParams()
        if not self.healthy:
            raise EngineUnavailable("the engine is not serving (shutting down, stopped or wedged)")
        with self._tok_lock:
            if isinstance(prompt, str):
                encoded = self.processor.encode(prompt, images, max_tiles)
            elif images:
                raise ValueError("a token-id prompt takes no images")
            else:
                encoded = encode_ids(self.processor, prompt)
        total = len(encoded.input_ids) + params.max_tokens
        if total > self.max_len:
            raise ValueError(
                f"prompt ({len(encoded.input_ids)} tokens incl. images) + max_tokens "
                f"({params.max_tokens}) = {total} exceeds the model's context of {self.max_len}"
            )
        stop_ids = [] if params.ignore_eos else self.stop_ids  # eos is then decoded (as nothing) and generation goes on
        req = Request(encoded, params, _Detok(self.processor.tokenizer, 1, list(params.stop), stop_ids), on_event)
        with self._cond:
            free = max(
                self.max_batch - len(self._running) - self._admitted, 0
            )  # slots the next step fills from the queue
            if len(self._waiting) >= self.max_queue + free:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting); retry later")
            self._waiting.append(req)
            self._cond.notify()
        return req

    def hold(self) -> threading.Condition:
        """``with engine.hold(): ...`` keeps the worker between steps, e.g. so several submits are prefilled
        together (tests use it to make arrivals deterministic)."""
        return self._cond

    def generate(self, prompt: str, images: list[Any] | None = None, **params: Any) -> str:
        """Blocking convenience: one request's text."""
        return self.submit(prompt, images, SamplingParams(**params)).result()

    def close(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Refuse new requests; let in-flight ones finish (or cancel them), then stop the worker."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while drain and self.in_flight and time.monotonic() < deadline and self._thread and self._thread.is_alive():
            time.sleep(0.02)
        with self._cond:
            for r in list(self._waiting) + self._running:
                r.cancel()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- the worker --------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                self._beat = time.monotonic()
                if self.fault == "die":
                    log.error("engine worker stopped by fault injection")
                    return
                with self._cond:
                    if not self._waiting and not self._running:
                        if self._closing:
                            return
                        self._cond.wait(0.2)
                        continue
                    admitted = self._admit()
                    self._admitted = len(admitted)
                self._drop_cancelled()
                if admitted:
                    self._guard(self._prefill, admitted)
                    self._admitted = 0  # also when the prefill failed
                if self._running:
                    self._guard(self._decode, None)

    def _admit(self) -> list[Request]:
        """Waiting requests that fit in the free slots and the prefill token budget (at least one)."""
        out: list[Request] = []
        budget = self.max_prefill_tokens
        while self._waiting and len(self._running) + len(out) < self.max_batch:
            r = self._waiting[0]
            if r.cancelled:
                self._waiting.popleft()
                self._finish(r, "cancelled")
                continue
            if out and r.prompt_tokens > budget:
                break
            budget -= r.prompt_tokens
            out.append(self._waiting.popleft())
        return out

    def _guard(self, step: Any, admitted: list[Request] | None) -> None:
        """Run a step; on failure, fail the rows it touched with an error event and keep serving."""
        try:
            step(admitted) if admitted is not None else step()
        except Exception as e:  # one bad batch must not take the server down
            log.exception("engine step failed")
            victims = [r for r in admitted or [] if r not in self._running]
            if admitted is None or len(victims) != len(admitted):  # the running batch may be half-updated
                victims += self._running
                self._running, self._batch = [], RunningBatch()
            for r in victims:
                if r.finish_reason is None:
                    self._finish(r, "error", f"{type(e).__name__}: {e}")

    def _prefill(self, reqs: list[Request]) -> None:
        t0 = time.perf_counter()
        batch = self.processor.collate([r.encoded for r in reqs], padding_side="left")
        batch.pop("labels", None)
        scored = [r.params.prompt_logprobs is not None for r in reqs]
        # every position's logits only when a row scores its prompt ([B, T, vocab]; else [B, 1, vocab])
        out = self.model(**batch, use_cache=True, logits_to_keep=0 if any(scored) else 1)
        width = batch["input_ids"].shape[1]
        for i, r in enumerate(reqs):
            if scored[i]:  # left padded: row i's prompt is its last prompt_tokens positions
                rows = out.logits[i, width - r.prompt_tokens :]
                r.prompt_logprobs = prompt_logprobs(rows, r.encoded.input_ids, r.params.prompt_logprobs or 0)
        nxt = self._sample(out.logits[:, -1], reqs)
        self._batch.join(out.past_key_values, batch["attention_mask"].to(self.model.device), out.xattn_state)
        self._running += reqs
        self._admitted = 0
        self.metrics.observe_step("prefill", time.perf_counter() - t0, sum(r.prompt_tokens for r in reqs))
        self._advance(nxt)

    def _decode(self) -> None:
        t0 = time.perf_counter()
        ids = torch.tensor([r.output_ids[-1] for r in self._running], device=self.model.device)[:, None]
        mask = self._batch.grow()
        out = self.model(ids, mask, past_key_values=self._batch.cache, xattn_state=self._batch.state, use_cache=True)
        self._batch.cache = out.past_key_values
        nxt = self._sample(out.logits[:, -1], self._running)
        self.metrics.observe_step("decode", time.perf_counter() - t0, len(self._running))
        self._advance(nxt, decode=True)

    def _sample(self, raw: torch.Tensor, reqs: list[Request]) -> list[int]:
        """Row i's next token from rows' own settings; rows without a seed share the global RNG. Rows that ask
        for logprobs get them from the `raw` logits (the model's own distribution)."""
        logits = raw.float().clone()
        logits[:, self.processor.pad_id] = float("-inf")  # as in generate: the image-pad token has no features
        for i, r in enumerate(reqs):
            if len(r.output_ids) < r.params.min_tokens:  # no end-of-sequence token yet
                logits[i, self.stop_ids] = float("-inf")
        greedy = logits.argmax(-1).tolist()
        out = []
        for i, r in enumerate(reqs):
            p = r.params
            if p.temperature <= 0:
                out.append(greedy[i])
            else:
                out.append(int(sample_next(logits[i : i + 1], True, p.temperature, p.top_p, r.generator)[0]))
        wanted = [r.params.logprobs if r.params.max_tokens else None for r in reqs]
        for r, entry in zip(reqs, step_logprobs(raw, out, wanted), strict=True):
            if entry is not None:
                r.logprobs.append(entry)
        return out

    def _advance(self, nxt: list[int], decode: bool = False) -> None:
        """Give each running row its new token (the newest rows are the last len(nxt)); drop finished rows."""
        rows = self._running[-len(nxt) :] if not decode else self._running
        now = time.perf_counter()
        for r, tok in zip(rows, nxt, strict=True):
            if r.params.max_tokens == 0:  # nothing to generate (a prompt scored, or an empty completion)
                self._finish(r, "length")
                continue
            r.output_ids.append(tok)
            if r.t_first is None:
                r.t_first = now
                self.metrics.ttft.observe(now - r.t_submit)
            r.t_last = now
            with self._tok_lock:
                r.detok._update(torch.tensor([tok]))
            reason = "stop" if r.detok.finished[0] else "length" if len(r.output_ids) >= r.params.max_tokens else None
            text = r.text
            safe = len(text) if reason else r.detok._safe_len(text)
            delta, r.sent = text[r.sent : safe], max(r.sent, safe)
            if reason:
                self._finish(r, reason, delta=delta)
            else:
                r.emit(Event(delta, [tok]))
        self._remove_finished()

    def _drop_cancelled(self) -> None:
        for r in self._running:
            if r.cancelled and r.finish_reason is None:
                self._finish(r, "cancelled")
        self._remove_finished()

    def _remove_finished(self) -> None:
        keep = [i for i, r in enumerate(self._running) if r.finish_reason is None]
        if len(keep) != len(self._running):
            self._batch.keep(keep)
            self._running = [self._running[i] for i in keep]

    def _finish(self, r: Request, reason: str, error: str | None = None, delta: str = "") -> None:
        r.finish_reason = reason
        self.metrics.finished(reason, r.prompt_tokens, len(r.output_ids), r.t_submit, r.t_first, r.t_last)
        r.emit(Event(delta, r.output_ids[-1:] if delta or reason in ("stop", "length") else [], reason, error))
