"""The serving engine: continuous batching for NVLM-D, -X and -H, usable without HTTP.

    engine = Engine(model, processor, max_batch=16, max_queue=64).start()
    req = engine.submit(chat_prompt("What is this?", 1), [image], SamplingParams(max_tokens=64))
    text = req.result()            # or: for event in req: print(event.text, end="")

One worker thread owns the model. Each step is nano-vllm's: the scheduler (``nvlm.serve.scheduler``) picks the
waiting requests that fit (free rows, a prompt-token budget, the KV budget) and the rows to preempt; the model
runner (``nvlm.inference.runner``, the same one ``model.generate`` drives) prefills the new rows together, so the
image path runs once per image and X/H blocks compute each image's K/V once, then decodes one token for every
row; the output processor (``nvlm.serve.output``) samples all rows at once and turns tokens into text and
events. Rows leave as soon as they finish; nobody waits for the slowest request of a static batch. Greedy output
equals ``model.generate`` for every request, and a seeded sampled request draws what ``model.generate(...,
seed=s)`` draws alone.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from nvlm.data.processor import Processor
from nvlm.inference.detok import Detokenizer, stop_ids
from nvlm.inference.runner import ModelRunner, sliding_window
from nvlm.serve.encoder_cache import EncoderCache, image_keys
from nvlm.serve.metrics import EngineMetrics
from nvlm.serve.output import OutputProcessor
from nvlm.serve.prefill import PrefillSteps
from nvlm.serve.prefix_cache import PrefixCache, block_hashes
from nvlm.serve.request import (
    EngineError,
    EngineUnavailable,
    Event,
    QueueFull,
    Request,
    SamplingParams,
    encode_ids,
)
from nvlm.serve.scheduler import Scheduler

__all__ = ["Engine", "EngineError", "EngineUnavailable", "Event", "QueueFull", "Request", "SamplingParams"]

log = logging.getLogger("nvlm.serve")


class Engine(PrefillSteps):
    """Continuous-batching generation over one NVLM model (see the module docstring). `max_kv_tokens` bounds
    rows × attended positions of a decoding step (None: no bound); past it the newest rows are preempted.
    `encoder_cache_gb`: the bound of the encoder cache (``nvlm.serve.encoder_cache``; 0: none); `prefix_cache`
    and its bound: reuse of prompt blocks' KV (``nvlm.serve.prefix_cache``)."""

    def __init__(
        self,
        model: Any,
        processor: Processor,
        max_batch: int = 16,
        max_queue: int = 64,
        max_prefill_tokens: int = 16384,
        stall_s: float = 120.0,
        metrics: EngineMetrics | None = None,
        max_kv_tokens: int | None = None,
        encoder_cache_gb: float = 1.0,
        prefix_cache: bool = True,
        prefix_cache_gb: float = 1.0,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.model, self.processor = model, processor
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = int(getattr(model.llm.config, "max_position_embeddings", 0) or 1 << 30)
        self.window = sliding_window(model.llm.config)  # rows of sliding-window LLMs stay within the window
        self.stall_s = stall_s
        self.stop_ids = stop_ids(processor.tokenizer)
        self.metrics = metrics or EngineMetrics()
        self._cond = threading.Condition()
        self._tok_lock = threading.Lock()  # one user of the tokenizer at a time (submit threads, the worker)
        self.scheduler = Scheduler(max_batch, max_prefill_tokens, max_kv_tokens)
        self.max_prefill_tokens = max_prefill_tokens  # also the chunk size of a longer prompt's prefill
        self._chunk: tuple[Request, Any, int, ModelRunner] | None = None  # a prompt being prefilled in chunks
        self.runner = ModelRunner(model)
        cache_bytes = int(encoder_cache_gb * 2**30)
        self.encoder_cache = EncoderCache(cache_bytes, self.metrics) if cache_bytes > 0 else None
        if prefix_cache and getattr(model, "tp_steps", None) is not None:  # its blocks would be rank 0's heads only
            log.info("tensor parallelism: the prefix cache is off")
            prefix_cache = False
        prefix_bytes = int(prefix_cache_gb * 2**30) if prefix_cache else 0
        self.prefix_cache = PrefixCache(prefix_bytes, self.metrics) if prefix_bytes > 0 else None
        self.output = OutputProcessor(processor.pad_id, self.stop_ids, self._tok_lock, self.metrics)
        self._admitted = 0  # taken from the queue, being prefilled: they hold rows already
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
    def _running(self) -> list[Request]:
        """The running requests, in the runner's row order."""
        return self.runner.owners

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def in_flight(self) -> int:
        return len(self.scheduler.waiting) + self._admitted + self.runner.n + (self._chunk is not None)

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
        self._check_size(len(encoded.input_ids), params.max_tokens)
        ends = [] if params.ignore_eos else self.stop_ids  # eos is then decoded (as nothing) and generation goes on
        req = Request(encoded, params, Detokenizer(self.processor.tokenizer, params.stop, ends), on_event)
        if (self.encoder_cache is not None or self.prefix_cache is not None) and encoded.plans:
            req.image_keys = image_keys(encoded)  # hashed here, on the caller's thread
        if self.prefix_cache is not None:
            tpt, xattn = self.processor.tokens_per_tile, bool(self.model.xattn)
            req.block_hashes = block_hashes(encoded, req.image_keys, self.processor.pad_id, tpt, xattn)
        with self._cond:
            free = max(
                self.max_batch - self.runner.n - self._admitted - (self._chunk is not None), 0
            )  # rows the next step fills from the queue
            if len(self.scheduler.waiting) >= self.max_queue + free:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting); retry later")
            self.scheduler.waiting.append(req)
            self._cond.notify()
        return req

    def _check_size(self, prompt: int, max_tokens: int) -> None:
        total = prompt + max_tokens
        if total > self.max_len:
            raise ValueError(
                f"prompt ({prompt} tokens incl. images) + max_tokens ({max_tokens}) = {total} exceeds the model's "
                f"context of {self.max_len}"
            )
        if self.window is not None and total > self.window:
            raise ValueError(
                f"prompt ({prompt} tokens incl. images) + max_tokens ({max_tokens}) = {total} exceeds the LLM's "
                f"sliding window of {self.window} tokens, which the engine serves within; shorten the request"
            )
        if not self.scheduler.fits(1, total):
            raise ValueError(
                f"prompt ({prompt} tokens incl. images) + max_tokens ({max_tokens}) = {total} exceeds the engine's "
                f"KV budget of {self.scheduler.max_kv_tokens} tokens; send a shorter prompt or lower max_tokens"
            )

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
            for r in list(self.scheduler.waiting) + self._running + ([self._chunk[0]] if self._chunk else []):
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
                    if not self.scheduler.waiting and not self.runner.n and self._chunk is None:
                        if self._closing:
                            return
                        self._cond.wait(0.2)
                        continue
                    # while a long prompt is prefilled in chunks, nobody else is admitted
                    admitted = self.scheduler.admit(self.runner.lengths, self.output.finish) if not self._chunk else []
                    self._admitted = len(admitted)
                self._drop_cancelled()
                if self._chunk is not None:
                    self._guard(self._next_chunk, [self._chunk[0]])
                elif admitted:
                    self._guard(self._prefill, admitted)
                    self._admitted = 0  # also when the prefill failed
                if self.runner.n:
                    self._guard(self._decode, None)

    def _guard(self, step: Any, admitted: list[Request] | None) -> None:
        """Run a step; on failure, fail the rows it touched with an error event and keep serving."""
        try:
            step(admitted) if admitted is not None else step()
        except Exception as e:  # one bad batch must not take the server down
            log.exception("engine step failed")
            self._chunk = None
            victims = [r for r in admitted or [] if r not in self._running]
            if admitted is None or len(victims) != len(admitted):  # the rows may be half-updated
                victims += self._running
                self.runner = ModelRunner(self.model)
            for r in victims:
                if r.finish_reason is None:
                    self.output.finish(r, "error", f"{type(e).__name__}: {e}")

    def _decode(self) -> None:
        t0 = time.perf_counter()
        with self._cond:  # the queue is shared with submitting threads
            preempted = self.scheduler.preempt(self.runner.owners, self.runner.lengths)
        for r in preempted:
            self.runner.release(r)
            self.metrics.count("num_preemptions")
        reqs = list(self.runner.owners)
        logits = self.runner.decode()
        tokens, host = self.output.sample(logits, reqs)
        self.runner.feed(0, tokens)
        self._finish_rows(self.output.advance(reqs, host))
        self.metrics.observe_step("decode", time.perf_counter() - t0, len(reqs))  # text and events included

    def _finish_rows(self, done: list[tuple[Request, str, str]]) -> None:
        for r, reason, delta in done:
            self.runner.release(r)
            self.output.finish(r, reason, delta=delta)

    def _drop_cancelled(self) -> None:
        if self._chunk is not None and self._chunk[0].cancelled:
            self.output.finish(self._chunk[0], "cancelled")
            self._chunk = None
        for r in [r for r in self.runner.owners if r.cancelled and r.finish_reason is None]:
            self.runner.release(r)
            self.output.finish(r, "cancelled")
