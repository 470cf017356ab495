"""Weighted data blends and the sample stream the trainer reads (paper §5: multimodal SFT + text-only SFT).

Two blends give the same interface (``draw(p)`` → the record at global position p, ``state_dict``):

* `Mixture` (``nvlm.data.mixture``): random access over record sources read from disk
  (``nvlm.data.sources``): nothing held per record, any position reached at once;
* `Blend`: sources whose records are lists in memory, mixed as this project always has (position i picks a
  source from a generator seeded with i, then that source's next item from a per-epoch shuffle); it walks
  its positions in order, so it stays the choice for small in-memory data and for runs that started with it.

`SampleStream` turns the blend into model inputs for one data-parallel rank. Rank r of W reads the positions
p ≡ r (mod W): ranks never share a sample and together read the samples one process would read, in the same
global order; with ``workers`` = K, the rank's j-th position is read and encoded by worker j mod K. The saved
position is the global one after the last sample used, so a resume on the same world size continues exactly;
on another world size every rank continues from the furthest position any rank had reached (the trainer
passes that rank's state): no sample is read twice, and the few positions that slower ranks had not reached
yet are skipped (at most W per sample a rank skipped as bad).

Bad data does not stop a run at once: a record that cannot be read or parsed, or whose image is corrupt or
missing, is skipped; an over-long sample gets fewer tiles per image (``nvlm.data.budget``) and is dropped only
when it does not fit at one tile (an image block is never cut). All are counted, and past a tolerance the
run stops with an error that lists the last bad records.
"""

from __future__ import annotations

import random
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from nvlm.data.formats import Conversation, DataFormatError
from nvlm.data.mixture import Mixture
from nvlm.data.workers import EncodePool, Loaded, Reader, Task, load_sample
from nvlm.vision.image_io import ImageLoadError

__all__ = [
    "STEP_COUNTS",
    "Blend",
    "Mixture",
    "SampleStream",
    "SampleTimeout",
    "Source",
    "TooManyBadSamples",
    "step_counts",
]

# per-step metrics (metrics.jsonl) → the stream's counters they count: samples kept at fewer tiles per image,
# dropped as too long even at one tile, and skipped as bad (unreadable, corrupt, timed out)
STEP_COUNTS = {"samples_degraded": "degraded", "samples_dropped": "dropped_too_long", "samples_bad": "bad_sample"}


def step_counts(before: dict[str, Any], after: dict[str, Any]) -> list[float]:
    """The `STEP_COUNTS` read between two ``SampleStream.state_dict()`` snapshots (one step's batch), in order."""
    return [float(after["counts"].get(k, 0) - before["counts"].get(k, 0)) for k in STEP_COUNTS.values()]


class Records(Protocol):
    """A list of conversations in memory, or a `nvlm.data.sources.RecordSource` reading them from disk."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Conversation: ...


@dataclass
class Source:
    name: str
    records: Records
    weight: float = 1.0
    max_tiles: int | None = None  # a cap below the model's tiling.max_tiles (InternVL's max_dynamic_patch)


class Blend:
    """A seeded weighted mixture of in-memory sources, walked in order; resumable from `state_dict()`."""

    def __init__(self, sources: list[Source], seed: int = 0) -> None:
        sources = [s for s in sources if s.weight > 0]
        if not sources or any(not s.records for s in sources):
            empty = [s.name for s in sources if not s.records]
            raise ValueError(f"a blend needs non-empty sources with weight > 0; empty: {empty}")
        self.sources, self.seed = sources, seed
        total = sum(s.weight for s in sources)
        self.weights = [s.weight / total for s in sources]
        self.position = 0
        self.taken = {s.name: 0 for s in sources}
        self._perm: dict[str, tuple[int, list[int]]] = {}

    def _step(self) -> tuple[int, int]:
        """The next (source index, item index)."""
        rng = random.Random(f"{self.seed}:{self.position}")
        s = rng.choices(range(len(self.sources)), weights=self.weights)[0]
        src = self.sources[s]
        k = self.taken[src.name]
        epoch, idx = divmod(k, len(src.records))
        if self._perm.get(src.name, (-1, []))[0] != epoch:
            order = list(range(len(src.records)))
            random.Random(f"{self.seed}:{src.name}:{epoch}").shuffle(order)
            self._perm[src.name] = (epoch, order)
        self.position += 1
        self.taken[src.name] = k + 1
        return s, self._perm[src.name][1][idx]

    def next(self) -> tuple[str, int, Conversation]:
        """The next (source name, item index, conversation)."""
        s, item = self._step()
        return self.sources[s].name, item, self.sources[s].records[item]

    def draw(self, p: int) -> tuple[str, int, int]:
        """(source name, item index, source index) at position p >= `position`, walking to it."""
        if p < self.position:
            raise ValueError(f"this blend walks forward only: position {p} is behind {self.position}")
        while True:
            s, item = self._step()
            if self.position == p + 1:
                return self.sources[s].name, item, s

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "taken": dict(self.taken), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("taken") or state.get("sources") or ()
        if set(saved) != set(self.taken) or state["seed"] != self.seed or "taken" not in state:
            raise ValueError(
                f"data blend changed since the checkpoint (sources {sorted(saved)} "
                f"seed {state['seed']} vs {sorted(self.taken)} seed {self.seed}); resuming would silently "
                "read other samples: start a new --out folder"
            )
        self.position, self.taken = state["position"], dict(state["taken"])


class SampleTimeout(RuntimeError):
    """One sample took longer than the read timeout (counted as a bad sample)."""


class TooManyBadSamples(RuntimeError):
    """The share of unusable samples passed the tolerance."""


@dataclass
class Drawn:
    position: int
    task: Task
    worker: int


class SampleStream:
    """A blend's samples for one rank → encoded samples with labels; bad, degraded, too-long ones counted."""

    def __init__(
        self,
        blend: Blend | Mixture,
        processor: Any,
        max_seq_len: int,
        system: str | None = None,
        max_bad_in_row: int = 100,
        max_bad_fraction: float = 0.1,
        rank: int = 0,
        world_size: int = 1,
        read_timeout: float | None = None,
        workers: int = 0,
    ) -> None:
        """`workers` > 0: samples are read and encoded in that many processes (``nvlm.data.workers``), with
        the same result as in this one. See the module doc for how ranks and workers share the blend."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.blend, self.processor, self.max_seq_len, self.system = blend, processor, max_seq_len, system
        self.rank, self.world_size = rank, world_size
        self.max_bad_in_row, self.max_bad_fraction = max_bad_in_row, max_bad_fraction
        self.counts: Counter[str] = Counter()
        self.recent_errors: deque[str] = deque(maxlen=5)
        self._bad_in_row = 0
        self.read_timeout = read_timeout
        self.trace: list[tuple[int, str, int, int]] | None = None  # [] logs each read: (position, source, item, worker)
        self.reader = Reader(
            processor,
            system,
            [s.records if not isinstance(s.records, list) else None for s in blend.sources],
            max_seq_len,
            [s.max_tiles for s in blend.sources],
        )
        self.pool: EncodePool | None = EncodePool(workers, self.reader) if workers > 0 else None

    def _draw(self) -> Drawn:
        """The next position that is this rank's (p ≡ rank mod world) and the record there."""
        w, r, p = self.world_size, self.rank, self.blend.position
        p += (r - p) % w
        name, item, s = self.blend.draw(p)
        records = self.blend.sources[s].records
        conv = records[item] if isinstance(records, list) else None
        workers = len(self.pool.workers) if self.pool is not None else 1
        where = conv.source if conv is not None and conv.source else f"{name}[{item}]"
        return Drawn(p, Task(s, item, where, conv), (p // w) % workers)

    def _load(self, task: Task) -> Loaded:
        """Read and encode one sample here; with `read_timeout`, in a daemon thread so that a read that blocks
        (a hung network mount) times out as a bad sample. A wedged thread is left behind (it wakes, or dies
        with the process); the bad-sample tolerance bounds how many."""
        if self.read_timeout is None:
            return load_sample(task, self.reader)
        out: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                out["value"] = load_sample(task, self.reader)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                out["error"] = e
            done.set()

        threading.Thread(target=work, name="nvlm-sample-read", daemon=True).start()
        if not done.wait(self.read_timeout):
            raise SampleTimeout(
                f"reading the sample took over {self.read_timeout:g} s (data.read_timeout_s); "
                "a FIFO, device or hung mount among its images?"
            )
        if "error" in out:
            raise out["error"]
        return out["value"]

    def next(self) -> Any:
        while True:
            drawn = self._draw()
            enc = self._accept(drawn, partial(self._load, drawn.task))
            if enc is not None:
                return enc

    def _accept(self, drawn: Drawn, load: Callable[[], Loaded]) -> Any:
        """Load one drawn sample and keep it, or count it as bad / too long and return None."""
        self.counts["read"] += 1
        if self.trace is not None:
            self.trace.append(
                (drawn.position, self.blend.sources[drawn.task.source].name, drawn.task.item, drawn.worker)
            )
        try:
            got = load()
        except SampleTimeout as e:
            self._bad(f"{drawn.task.where}: {e}", "bad_sample")
            return None
        except (ImageLoadError, DataFormatError, ValueError) as e:  # the message names the record
            self._bad(str(e), "bad_sample")
            return None
        if len(got.encoded.input_ids) > self.max_seq_len:
            self.counts["dropped_too_long"] += 1  # too long even at one tile per image: never cut, dropped
            return None
        if got.degraded:
            self.counts["degraded"] += 1  # kept at fewer tiles per image
        self._bad_in_row = 0
        self.counts["used"] += 1
        self.counts["used_with_images" if got.has_images else "used_text_only"] += 1
        return got.encoded

    def _bad(self, message: str, kind: str) -> None:
        self.counts[kind] += 1
        self._bad_in_row += 1
        self.recent_errors.append(message)
        bad = self.counts["bad_sample"]
        if self._bad_in_row > self.max_bad_in_row or (
            self.counts["read"] >= 100 and bad > self.max_bad_fraction * self.counts["read"]
        ):
            raise TooManyBadSamples(
                f"{bad} bad samples of {self.counts['read']} read ({self._bad_in_row} in a row; tolerance: "
                f"{self.max_bad_in_row} in a row or {self.max_bad_fraction:.0%}). Last errors:\n  "
                + "\n  ".join(self.recent_errors)
                + "\nFix or remove those records (or raise data.max_bad_*)."
            )

    def batch(self, size: int) -> list[Any]:
        pool = self.pool
        if pool is None:
            return [self.next() for _ in range(size)]
        out: list[Any] = []
        while len(out) < size:  # draw exactly what is missing, load it in the workers, accept it in order
            drawn = [self._draw() for _ in range(size - len(out))]
            pending = [pool.submit(d.task, d.worker) for d in drawn]
            for d, fut in zip(drawn, pending):
                enc = self._accept(d, partial(pool.result, fut, self.read_timeout, SampleTimeout))
                if enc is not None:
                    out.append(enc)
        return out

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def state_dict(self) -> dict[str, Any]:
        return {"blend": self.blend.state_dict(), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.blend.load_state_dict(state["blend"])
        self.counts = Counter(state["counts"])
