"""A least-recently-used store bounded in bytes: what the encoder cache and the prefix cache keep their entries in."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """Entries by key, evicted least recently used first once their bytes (`size_of` each) exceed `max_bytes`;
    an entry larger than the whole bound is not kept."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self.max_bytes, self.size_of = max_bytes, size_of
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self.bytes = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __getitem__(self, key: Hashable) -> V:
        return self._entries[key]

    def get(self, key: Hashable) -> V | None:
        """The entry (marked as recently used), or None."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: V) -> bool:
        """Keep `value` (False: larger than the whole bound, not kept); older entries leave to make room."""
        size = self.size_of(value)
        if size > self.max_bytes:
            return False
        if key in self._entries:
            self.bytes -= self.size_of(self._entries.pop(key))
        self._entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= self.size_of(old)
        return True
