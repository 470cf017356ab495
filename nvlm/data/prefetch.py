"""Reading the next steps' batches in a background thread while the current step computes.

Image decoding and tiling (Pillow) and tokenization (tokenizers) release the GIL for most of their work, so
one thread keeps the accelerator fed without worker processes. The thread is the only reader of the sample
stream while it runs; each batch comes with a snapshot of the stream's state right after it, so a checkpoint
records the position of the last batch *trained on*, never of one merely read ahead, and resuming stays
exact. An error (a bad sample past the tolerance) travels through the queue and is raised, in order, by
the step that would have used that batch.

Waiting never outlives a stop request: ``next(stop)`` polls `stop` while it waits and returns None once it
is set (a read wedged on a hung file system must not make SIGTERM or Ctrl-C useless), and ``close`` gives
a wedged thread ``CLOSE_WAIT_S`` seconds, then leaves it (a daemon thread: it dies with the process).
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

POLL_S = 0.1
CLOSE_WAIT_S = 5.0


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

    def next(self, stop: Callable[[], bool] = lambda: False) -> tuple[Any, Any] | None:
        """The next (value, state); None as soon as ``stop()`` is true while waiting for it."""
        while True:
            try:
                value, error, state = self._queue.get(timeout=POLL_S)
                break
            except queue.Empty:
                if stop():
                    return None
        if error is not None:
            raise error
        return value, state

    def close(self) -> None:
        """Stop the thread; batches read ahead are dropped (the stream's state is the consumer's business)."""
        self._closed.set()
        deadline = time.monotonic() + CLOSE_WAIT_S
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.get(timeout=POLL_S)
            except queue.Empty:
                pass
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))


class StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) both ask the run to save and stop: ``with StopSignals(on_request) as s:``
    (flag ``s.requested``). A second Ctrl-C while stopping raises KeyboardInterrupt (the user insists)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, on_request: Callable[[], None] | None = None) -> None:
        self.requested = False
        self._on_request = on_request
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self._on_request is not None:
            self._on_request()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
