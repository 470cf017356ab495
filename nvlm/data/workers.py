"""Data worker processes (``data.workers``): images decoded, tiled and tokenized in N processes, accepted in order.

One prefetch thread (``nvlm.data.prefetch``) keeps up with about 10 samples/s at 6+1 tiles; a model of ≈ 2B
parameters or less on a GPU wants more. With ``data.workers = N`` the sample stream still walks the blend
itself (cheap: no image is read) and decides, in order, which samples are kept (bad or too long ones are
counted and skipped as before); only the encoding of the samples it drew runs in the pool. The kept samples,
their order, the counts and the saved data position are therefore exactly those of ``data.workers = 0``, so
a run resumes the same with or without workers (tested).

Workers are spawned (not forked: the trainer's threads and torch's thread pools do not survive a fork), get
the processor once, and run one torch thread each. A read that outlives ``data.read_timeout_s`` counts as a
bad sample; its worker stays busy until the read returns, so a hung mount can take every worker, and the
bad-sample tolerance then stops the run with the errors listed.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from nvlm.data.formats import Conversation, chatml_segments

_WORKER: dict[str, Any] = {}  # the processor and system message of this worker process (set once, at start)


def _start(processor: Any, system: str | None) -> None:
    import torch

    torch.set_num_threads(1)  # N workers beside the trainer: one thread each, no oversubscription
    _WORKER.update(processor=processor, system=system)


def _encode(conv: Conversation) -> Any:
    return _WORKER["processor"].encode_segments(chatml_segments(conv, _WORKER["system"]), conv.images)


class EncodePool:
    """``submit(conv)`` → a future of the encoded sample; ``result(future, timeout)`` raises `on_timeout` on expiry."""

    def __init__(self, workers: int, processor: Any, system: str | None) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(processor, system),
        )

    def submit(self, conv: Conversation) -> Future:
        return self._pool.submit(_encode, conv)

    @staticmethod
    def result(future: Future, timeout: float | None, on_timeout: type[Exception]) -> Any:
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            raise on_timeout(
                f"reading the sample took over {timeout:g} s in a data worker (data.read_timeout_s); "
                "a FIFO, device or hung mount among its images?"
            ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
