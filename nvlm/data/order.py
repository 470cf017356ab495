"""A source's per-epoch order as a keyed bijection of [0, N): computed per item, never stored.

A shuffled list of N indices costs 8 bytes a record as an int64 array (920 MB for LAION-115M, in every
process) and about 36 bytes as a Python list; a Feistel network costs nothing per record. ``EpochOrder(n,
key)(epoch, k)`` is the k-th item of that epoch: a 6-round balanced Feistel permutation of the smallest even
power of two >= n, walked on ("cycle walking") until the value falls inside [0, n); since that domain is
less than 4n, a value takes fewer than 4 walks on average. Each round mixes the right half with a
round key through the splitmix64 finalizer. The round keys come from (key, epoch) through BLAKE2b, so every
epoch has its own order, and the same key, epoch and n always give the same order on any machine.

``EpochOrder.many`` does the same for an array of positions with numpy (tests and benchmarks check whole
epochs with it).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

ROUNDS = 6
_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finalizer: a 64-bit bijection whose output bits each depend on every input bit."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix_array(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)  # uint64 arithmetic wraps, as the & _M64 above
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@lru_cache(maxsize=256)
def round_keys(key: str, epoch: int) -> tuple[int, ...]:
    digest = hashlib.blake2b(f"{key}:{epoch}".encode(), digest_size=8 * ROUNDS).digest()
    return tuple(int.from_bytes(digest[8 * r : 8 * r + 8], "little") for r in range(ROUNDS))


class EpochOrder:
    """``order(epoch, k)`` → the item at place k of that epoch; a bijection of [0, n) for every epoch."""

    def __init__(self, n: int, key: str) -> None:
        if n < 1:
            raise ValueError(f"an epoch order needs at least one item, got n={n}")
        self.n, self.key = n, key
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)  # bits per half: (2^half)^2 >= n
        self.mask = (1 << self.half) - 1

    def _encrypt(self, x: int, keys: tuple[int, ...]) -> int:
        left, right = x >> self.half, x & self.mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, epoch: int, k: int) -> int:
        if not 0 <= k < self.n:
            raise IndexError(f"place {k} is outside an epoch of {self.n} items")
        keys = round_keys(self.key, epoch)
        x = self._encrypt(k, keys)
        while x >= self.n:  # cycle walking: stays a bijection of [0, n)
            x = self._encrypt(x, keys)
        return x

    def many(self, epoch: int, places: np.ndarray) -> np.ndarray:
        """`self(epoch, k)` for every k in `places` (int64 array), vectorised."""
        keys = [np.uint64(k) for k in round_keys(self.key, epoch)]
        half, mask, n = np.uint64(self.half), np.uint64(self.mask), np.uint64(self.n)

        def encrypt(x: np.ndarray) -> np.ndarray:
            left, right = x >> half, x & mask
            for k in keys:
                left, right = right, left ^ (_mix_array(right ^ k) & mask)
            return (left << half) | right

        x = encrypt(np.asarray(places, dtype=np.uint64))
        outside = x >= n
        while outside.any():
            x[outside] = encrypt(x[outside])
            outside = x >= n
        return x.astype(np.int64)
