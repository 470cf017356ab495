"""Weighted data blends and the sample stream the trainer reads (paper §5: multimodal SFT + text-only SFT).

A `Blend` mixes sources by weight with a seed: step i picks a source from a seeded generator, then that
source's next item from a per-epoch shuffle. Its whole position is a small dict (`state_dict`), so a resumed
run reads exactly the samples it would have read. `SampleStream` turns conversations into model inputs and
keeps going through bad data: a sample longer than the sequence length is dropped (an image block is never
cut), a corrupt or missing image skips its sample; both are counted, and past a tolerance the run stops
with an error that says what went wrong.
"""

from __future__ import annotations

import random
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from nvlm.data.formats import Conversation, DataFormatError, chatml_segments
from nvlm.data.processor import Encoded
from nvlm.data.workers import EncodePool
from nvlm.vision.image_io import ImageLoadError


@dataclass
class Source:
    name: str
    records: list[Conversation]
    weight: float = 1.0


class Blend:
    """A seeded weighted mixture of sources; deterministic and resumable from `state_dict()`."""

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

    def next(self) -> tuple[str, int, Conversation]:
        """The next (source name, item index, conversation)."""
        rng = random.Random(f"{self.seed}:{self.position}")
        src = rng.choices(self.sources, weights=self.weights)[0]
        k = self.taken[src.name]
        epoch, idx = divmod(k, len(src.records))
        if self._perm.get(src.name, (-1, []))[0] != epoch:
            order = list(range(len(src.records)))
            random.Random(f"{self.seed}:{src.name}:{epoch}").shuffle(order)
            self._perm[src.name] = (epoch, order)
        item = self._perm[src.name][1][idx]
        self.position += 1
        self.taken[src.name] = k + 1
        return src.name, item, src.records[item]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "taken": dict(self.taken), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["taken"]) != set(self.taken) or state["seed"] != self.seed:
            raise ValueError(
                f"data blend changed since the checkpoint (sources {sorted(state['taken'])} seed "
                f"{state['seed']} vs {sorted(self.taken)} seed {self.seed}); resuming would silently "
                "read other samples: start a new --out folder"
            )
        self.position, self.taken = state["position"], dict(state["taken"])


class SampleTimeout(RuntimeError):
    """One sample took longer than the read timeout (counted as a bad sample)."""


class TooManyBadSamples(RuntimeError):
    """The share of unusable samples passed the tolerance."""


class SampleStream:
    """Conversations from a blend → encoded samples with labels; bad and too-long samples are counted."""

    def __init__(
        self,
        blend: Blend,
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
        """With `world_size` > 1 every process walks the same blend sequence (cheap: no image is read) and
        takes the positions p with p % world_size == rank, so processes never share a sample and together
        read the samples one process would read, in the same global order. `workers` > 0: ``batch`` encodes
        in that many processes (``nvlm.data.workers``), with the same result as in this one."""
        self.blend, self.processor, self.max_seq_len, self.system = blend, processor, max_seq_len, system
        self.rank, self.world_size = rank, world_size
        self.max_bad_in_row, self.max_bad_fraction = max_bad_in_row, max_bad_fraction
        self.counts: Counter[str] = Counter()
        self.recent_errors: deque[str] = deque(maxlen=5)
        self._bad_in_row = 0
        self.read_timeout = read_timeout
        self.pool: EncodePool | None = EncodePool(workers, processor, system) if workers > 0 else None

    def _encode(self, conv: Conversation) -> Encoded:
        """Read and encode one sample; with `read_timeout`, in a daemon thread so that a read that blocks (a
        hung network mount) times out as a bad sample. A wedged thread is left behind (it wakes, or dies with
        the process; a pool's threads would be joined at exit); the bad-sample tolerance bounds how many."""
        segments = chatml_segments(conv, self.system)
        if self.read_timeout is None:
            return self.processor.encode_segments(segments, conv.images)
        out: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                out["value"] = self.processor.encode_segments(segments, conv.images)
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

    def next(self) -> Encoded:
        while True:
            name, idx, conv = self._draw()
            enc = self._accept(name, idx, conv, partial(self._encode, conv))
            if enc is not None:
                return enc

    def _draw(self) -> tuple[str, int, Conversation]:
        """The blend's next conversation that is this process's to read."""
        while True:
            name, idx, conv = self.blend.next()
            if (self.blend.position - 1) % self.world_size == self.rank:
                return name, idx, conv

    def _accept(self, name: str, idx: int, conv: Conversation, encode: Callable[[], Encoded]) -> Encoded | None:
        """Encode one drawn sample and keep it, or count it as bad / too long and return None."""
        self.counts["read"] += 1
        try:
            enc = encode()
        except (ImageLoadError, DataFormatError, ValueError, SampleTimeout) as e:
            self._bad(f"{conv.source or f'{name}[{idx}]'}: {e}", "bad_sample")
            return None
        if len(enc.input_ids) > self.max_seq_len:
            # never cut an image block (or an answer): drop the sample, count it
            self.counts["dropped_too_long"] += 1
            return None
        self._bad_in_row = 0
        self.counts["used"] += 1
        self.counts["used_with_images" if conv.images else "used_text_only"] += 1
        return enc

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

    def batch(self, size: int) -> list[Encoded]:
        pool = self.pool
        if pool is None:
            return [self.next() for _ in range(size)]
        out: list[Encoded] = []
        while len(out) < size:  # draw exactly what is missing, encode it in parallel, accept it in order
            drawn = [self._draw() for _ in range(size - len(out))]
            pending = [pool.submit(conv) for _, _, conv in drawn]
            for (name, idx, conv), fut in zip(drawn, pending):
                enc = self._accept(name, idx, conv, partial(pool.result, fut, self.read_timeout, SampleTimeout))
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
