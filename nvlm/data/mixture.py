"""A weighted blend of record sources with random access: position p → (source, record), in O(1), for any p.

The blend is one global sequence of positions 0, 1, 2, … . Positions come in blocks of ``BLOCK``; block b's
sources are drawn i.i.d. by weight from a generator seeded with (seed, b), and the j-th position of source s
in the whole sequence takes that source's j-th draw: epoch j // N_s, place j % N_s of the epoch's order
(``nvlm.data.order``: a keyed bijection, nothing stored). To know j at position p only the draws per source
before p's block are needed; they are carried from block to block (a process moves forward through its own
positions) and saved with the position (``state_dict``), so a process starts or resumes anywhere at once.

So any process can read any share of the sequence without walking the rest of it (``SampleStream`` gives
rank r of W the positions p ≡ r mod W, and its data workers every K-th of those), every record comes once
per epoch of its source, and nothing is held per record. Memory: one block (2 int64 arrays of ``BLOCK``).
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from nvlm.data.order import EpochOrder

BLOCK = 4096


class Mixture:
    """``draw(p)`` → (source name, record index, source index); deterministic in (sources, weights, seed)."""

    def __init__(self, sources: list[Any], seed: int = 0) -> None:
        """`sources`: ``nvlm.data.blend.Source`` objects whose ``records`` have a length and ``records[i]``."""
        sources = [s for s in sources if s.weight > 0]
        empty = [s.name for s in sources if len(s.records) == 0]
        if not sources or empty:
            raise ValueError(f"a blend needs non-empty sources with weight > 0; empty: {empty}")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"blend source names must differ (give each a name): {names}")
        self.sources, self.seed = sources, seed
        weights = np.array([float(s.weight) for s in sources])
        self.weights = weights / weights.sum()
        self.orders = [EpochOrder(len(s.records), f"{seed}:{s.name}") for s in sources]
        self.position = 0
        self._block = -1
        self._choice = self._within = np.zeros(0, np.int64)
        self._start = np.zeros(len(sources), np.int64)  # each source's draws before block self._block
        self._known = (0, self._start.copy())  # (block, draws before it): where a walk may start

    def _layout(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Block b: the source of each position, its rank among that source's positions in the block, and
        the draws per source."""
        rng = np.random.default_rng([zlib.crc32(str(self.seed).encode()), b])
        choice = rng.choice(len(self.sources), size=BLOCK, p=self.weights)
        counts = np.bincount(choice, minlength=len(self.sources))
        within = np.empty(BLOCK, np.int64)
        within[np.argsort(choice, kind="stable")] = np.arange(BLOCK) - np.repeat(np.cumsum(counts) - counts, counts)
        return choice, within, counts

    def _goto(self, b: int) -> None:
        """Make block b current, walking forward from the nearest known block at or before it."""
        if b == self._block:
            return
        start_block, start = self._known if self._known[0] <= b else (0, np.zeros(len(self.sources), np.int64))
        if self._block >= 0 and start_block < self._block <= b:  # the current block is closer
            start_block, start = self._block, self._start
        draws = start.copy()
        for walked in range(start_block, b):
            draws += self._layout(walked)[2]
        self._choice, self._within, _ = self._layout(b)
        self._block, self._start = b, draws
        self._known = (b, draws.copy())

    def locate(self, p: int) -> tuple[int, int]:
        """(source index, that source's draw number) of position p."""
        b, o = divmod(p, BLOCK)
        self._goto(b)
        s = int(self._choice[o])
        return s, int(self._start[s] + self._within[o])

    def draw(self, p: int) -> tuple[str, int, int]:
        """The record at position p: (source name, record index, source index); the position moves past p."""
        s, j = self.locate(p)
        epoch, place = divmod(j, self.orders[s].n)
        self.position = p + 1
        return self.sources[s].name, self.orders[s](epoch, place), s

    def epoch_of(self, p: int) -> dict[str, float]:
        """Epochs of each source consumed before position p (fractions: 1.5 = one and a half)."""
        self._goto(p // BLOCK)
        o = p % BLOCK
        draws = self._start + np.bincount(self._choice[:o], minlength=len(self.sources))
        return {s.name: float(d) / len(s.records) for s, d in zip(self.sources, draws)}

    def state_dict(self) -> dict[str, Any]:
        b = self.position // BLOCK
        self._goto(b)
        return {
            "kind": "mixture",
            "position": self.position,
            "seed": self.seed,
            "sources": [s.name for s in self.sources],
            "block": b,
            "draws": [int(d) for d in self._start],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [s.name for s in self.sources]
        saved = state.get("sources", sorted(state.get("taken", {})))
        if state.get("kind") != "mixture" or state["seed"] != self.seed or saved != names:
            raise ValueError(
                f"data blend changed since the checkpoint (sources {saved} seed {state.get('seed')} vs {names} "
                f"seed {self.seed}); resuming would silently read other samples: start a new --out folder"
            )
        self.position = int(state["position"])
        self._block = -1
        self._known = (int(state["block"]), np.array(state["draws"], np.int64))
