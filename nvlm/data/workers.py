"""Reading and encoding one drawn sample, in this process or in data worker processes (``data.workers``).

A task names a drawn record: (source index, record index), plus the conversation itself when its source is a
list in memory. ``load_sample`` reads the record from its source (``nvlm.data.sources``), fits it to the
sequence (``nvlm.data.budget``: fewer tiles before dropping) and encodes it (decode, tile, tokenize).

With ``data.workers = K`` the sample stream hands its j-th sample to worker j mod K, each worker a process of
its own: worker k of rank r reads exactly the positions that are its own (``SampleStream``), and reopens the
sources' indexes itself (sources pickle as their paths). The stream accepts the results in draw order, so the
kept samples, their order, the counts and the saved position are those of ``data.workers = 0``, and a run
resumes the same with any number of workers (tested).

Workers are spawned (not forked: the trainer's threads and torch's thread pools do not survive a fork), get
the processor once, and run one torch thread each. A read that outlives ``data.read_timeout_s`` counts as a
bad sample; its worker stays busy until the read returns, so a hung mount can take every worker, and the
bad-sample tolerance then stops the run with the errors listed.

Workers ignore SIGINT and SIGTERM: torchrun, Slurm and a terminal's Ctrl-C signal the whole process group,
and the trainer, not its workers, decides what a stop means (save a checkpoint, then exit). Closing the pool
kills its workers rather than waiting for them: a worker wedged on a hung read would otherwise hold the
trainer's exit forever, and nothing a worker holds needs saving.
"""

from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from nvlm.data.budget import encode_within, model_max_tiles
from nvlm.data.formats import BadRecord, Conversation, chatml_segments
from nvlm.data.processor import Encoded
from nvlm.vision.image_io import ImageLoadError


@dataclass
class Task:
    source: int
    item: int
    where: str  # "name[item]": names the sample in errors when its record does not
    conv: Conversation | None = None  # in-memory sources send the record; others are read where it runs


@dataclass
class Loaded:
    encoded: Encoded
    has_images: bool
    degraded: bool  # encoded at fewer tiles per image than its budget, to fit the sequence


@dataclass
class Reader:
    """What reading a sample needs: the processor, the sources (None: in memory), the length and tile caps."""

    processor: Any
    system: str | None
    sources: list[Any]
    max_len: int
    max_tiles: list[int | None]  # per source


def load_sample(task: Task, reader: Reader) -> Loaded:
    """Read, fit and encode one sample; a `BadRecord` naming the record when it cannot be used."""
    conv = task.conv if task.conv is not None else reader.sources[task.source][task.item]
    where = conv.source or task.where
    try:
        segments = chatml_segments(conv, reader.system)
        enc, tiles = encode_within(
            reader.processor, segments, conv.images, reader.max_len, reader.max_tiles[task.source]
        )
    except (ImageLoadError, ValueError) as e:  # a broken image, a control token in the text, …
        raise BadRecord(f"{where}: {e}") from e
    top = model_max_tiles(reader.processor) or tiles
    return Loaded(enc, bool(conv.images), tiles < min(top, reader.max_tiles[task.source] or top))


_WORKER: dict[str, Any] = {}  # this worker process's Reader (set once, at start)


def _start(reader: Reader) -> None:
    import torch

    for stop in (signal.SIGINT, signal.SIGTERM):  # the trainer handles stops (see the module doc)
        signal.signal(stop, signal.SIG_IGN)
    torch.set_num_threads(1)  # K workers beside the trainer: one thread each, no oversubscription
    _WORKER["reader"] = reader


def _load(task: Task) -> Loaded:
    return load_sample(task, _WORKER["reader"])


class EncodePool:
    """K worker processes; ``submit(task, k)`` runs `task` in worker k; ``result(future, timeout)`` waits."""

    def __init__(self, workers: int, reader: Reader) -> None:
        context = multiprocessing.get_context("spawn")
        self.workers = [
            ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_start, initargs=(reader,))
            for _ in range(workers)
        ]

    def submit(self, task: Task, worker: int) -> Future:
        return self.workers[worker % len(self.workers)].submit(_load, task)

    @staticmethod
    def result(future: Future, timeout: float | None, on_timeout: type[Exception]) -> Any:
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            raise on_timeout(
                f"reading the sample took over {timeout:g} s in a data worker (data.read_timeout_s); "
                "a FIFO, device or hung mount among its images?"
            ) from None

    def pids(self) -> list[int]:
        return [pid for pool in self.workers for pid in pool._processes]  # started lazily: after a submit

    def close(self) -> None:
        """Cancel what is queued and kill the workers (they ignore SIGTERM; a wedged one would never exit)."""
        for pool in self.workers:
            processes = list(pool._processes.values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.kill()
            for process in processes:
                process.join(timeout=5)
