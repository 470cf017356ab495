"""The encoder cache: each image's projected tile features (vision tower → projector, paper §4.1), kept across
requests and looked up by the image's content, so the same image sent again skips the vision encoder, the most
expensive part of a VLM's time to first token.

For NVLM-X and -H it also keeps each gated cross-attention block's K/V of a sample's image memory (paper §4.3),
so a repeated image with a new question skips every block's K/V projections as well: the memory is fixed by the
sample's images and its layout (which tiles and tile tags, in which order), which make the key.

Before any of that, the cache also keeps each image's tiles by the bytes it was sent in (and its tile budget), so
the same image sent again skips decoding and tiling too: that lookup runs on the submitting threads.

An image's key for its features is a hash of its tiles' pixels (the decoded image as tiled with the request's tile
settings) and its tile plan, taken on the submitting thread. Tiles, features and memory K/V share one
least-recently-used store bounded in bytes (``--encoder-cache-gb``; 0 turns the cache off): all are what a repeated
image saves, and one bound is what an operator sizes. Hits, lookups and bytes held are in ``/metrics``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Hashable
from typing import Any

import torch

from nvlm.data.processor import TiledImage
from nvlm.inference.kv_cache import BlockKV
from nvlm.serve.lru import ByteLRU
from nvlm.serve.metrics import EngineMetrics


def image_keys(encoded: Any) -> list[tuple[str, int]]:
    """(content key, tile count) of each image of an ``Encoded`` sample, in the order of its tiles."""
    out: list[tuple[str, int]] = []
    start = 0
    for plan in encoded.plans:
        n = plan.num_tiles
        tiles = encoded.pixel_values[start : start + n].contiguous()  # [n, 3, S, S]
        h = hashlib.blake2b(tiles.numpy().tobytes(), digest_size=16)
        h.update(repr((plan, tuple(tiles.shape), str(tiles.dtype))).encode())
        out.append((h.hexdigest(), n))
        start += n
    return out


def memory_key(sample: Any, keys: list[tuple[str, int]]) -> Hashable | None:
    """The key of a sample's x-attn memory (None: it has none): its images' keys and its memory recipe (local
    tile indices and tag token ids, in order)."""
    if not sample.memory_len or not keys:
        return None
    return ("memory", tuple(k for k, _ in keys), repr(sample.memory))


Entry = torch.Tensor | BlockKV | TiledImage


def _nbytes(entry: Entry) -> int:
    if isinstance(entry, TiledImage):
        entry = entry.pixel_values
    tensors = [entry] if isinstance(entry, torch.Tensor) else [t for kv in entry.values() for t in kv]
    return sum(t.numel() * t.element_size() for t in tensors)


class EncoderCache:
    """Tiles per (image bytes, tile budget), projected features [tiles, tokens_per_tile, d] per image key and each
    block's memory K/V [1, kvH, m, hd] per memory key, least recently used evicted first."""

    def __init__(self, max_bytes: int, metrics: EngineMetrics) -> None:
        self.metrics = metrics
        self._entries: ByteLRU[Entry] = ByteLRU(max_bytes, _nbytes)
        self._lock = threading.Lock()  # the engine's thread and the submitting threads share the store

    def _get(self, key: Hashable) -> Entry | None:
        with self._lock:
            return self._entries.get(key)

    def _put(self, key: Hashable, value: Entry) -> None:
        with self._lock:
            self._entries.put(key, value)
            self.metrics.gauges["encoder_cache_bytes"] = self._entries.bytes

    def tiled(self, data: bytes, max_tiles: int, make: Callable[[], TiledImage]) -> TiledImage:
        """The tiles of an image sent as `data`, for a budget of `max_tiles`: held ones, else `make()` (decode and
        tile) kept for the next time (counted in ``/metrics``)."""
        key = ("tiled", hashlib.blake2b(data, digest_size=16).hexdigest(), max_tiles)
        self.metrics.count("image_tile_cache_queries")
        hit = self._get(key)
        if hit is not None:
            self.metrics.count("image_tile_cache_hits")
            assert isinstance(hit, TiledImage)
            return hit
        tiled = make()
        self._put(key, tiled)
        return tiled

    def memory_kv(self, key: Hashable | None) -> BlockKV | None:
        """Each block's K/V of the memory `key` names, when held (counted in ``/metrics``)."""
        if key is None:
            return None
        self.metrics.count("xattn_kv_cache_queries")
        hit = self._get(key)
        if hit is None:
            return None
        self.metrics.count("xattn_kv_cache_hits")
        assert isinstance(hit, dict)
        return hit

    def keep_memory_kv(self, key: Hashable | None, kv: BlockKV | None) -> None:
        """Keep a row's memory K/V (copied: the runner's views change as rows come and go)."""
        if key is not None and kv is not None:
            self._put(key, {i: (k.clone(), v.clone()) for i, (k, v) in kv.items()})

    def features(self, model: Any, samples: list[Any], keys: list[list[tuple[str, int]]]) -> torch.Tensor | None:
        """The features of every tile of `samples` in the order the processor collates them (None: no image);
        images not cached go through the vision tower and projector together, once."""
        if not any(keys):
            return None
        found: list[torch.Tensor | None] = []
        missing: list[torch.Tensor] = []  # the tiles of images not in the cache (or repeated within this batch)
        pending: dict[str, int] = {}  # key → index in `found` of its first occurrence in this batch
        for sample, sample_keys in zip(samples, keys, strict=True):
            start = 0
            for key, n in sample_keys:
                hit = self._get(key)
                assert hit is None or isinstance(hit, torch.Tensor)
                self.metrics.count("encoder_cache_queries")
                if hit is not None:
                    self.metrics.count("encoder_cache_hits")
                elif key not in pending:
                    pending[key] = len(found)
                    missing.append(sample.pixel_values[start : start + n])
                found.append(hit)
                start += n
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            computed = model.encode_tiles(torch.cat(missing))  # [tiles, tokens_per_tile, d]
            for key, feats in zip(pending, computed.split([t.shape[0] for t in missing]), strict=True):
                fresh[key] = feats
                self._put(key, feats)
        flat = [k for sample_keys in keys for k, _ in sample_keys]
        return torch.cat([f if f is not None else fresh[k] for f, k in zip(found, flat, strict=True)])
