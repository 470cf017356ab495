"""Reading the next steps' batches in a background thread while the current step computes.

Image decoding and tiling (Pillow) and tokenization (tokenizers) release the GIL for most of their work, so
one thread keeps the accelerator fed without worker processes. The thread is the only reader of the sample
stream while it runs; each batch comes with a snapshot of the stream's state right after it, so a checkpoint
records the position of the last batch *trained on*, never of one merely read ahead, and resuming stays
exact. An error (a bad sample past the tolerance) travels through the queue and is raised, in order, by
the step that would have used that batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class Prefetcher:
    """``next()`` → (value, state after it) from `produce`/`snapshot` run `depth` steps ahead in a thread."""

    def __init__(self, produce: Callable[[], Any], snapshot: Callable[[], Any], depth: int = 1) -> None:
        self._produce, self._snapshot = produce, snapshot
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvlm-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                item: tuple = (self._produce(), None, self._snapshot())
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, who raises it
                item = (None, e, None)
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return

    def next(self) -> tuple[Any, Any]:
        value, error, state = self._queue.get()
        if error is not None:
            raise error
        return value, state

    def close(self) -> None:
        """Stop the thread; batches read ahead are dropped (the stream's state is the consumer's business)."""
        self._closed.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()
