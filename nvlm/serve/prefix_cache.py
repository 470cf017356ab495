"""The prefix cache: the LLM's KV of prompt blocks already computed, reused by later requests whose prompt starts
the same way (vLLM's automatic prefix caching: block-level hashing, each block's hash chained to its prefix's).

A block is ``BLOCK`` tokens. An image-pad token is hashed as (its image's content key, its offset), never as the
pad id, so two different images never share KV. For NVLM-X/H a token's KV also depends on the images its
cross-attention sees: their keys start the chain, so only prompts with the same images share blocks. Blocks
are kept least-recently-used first out within a bound in bytes; a hit copies the blocks into the new row (no
compute) and the prefill runs only on the rest of the prompt.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from nvlm.inference.kv_cache import KVPool
from nvlm.serve.lru import ByteLRU
from nvlm.serve.metrics import EngineMetrics

Block = list[tuple[torch.Tensor, torch.Tensor]]  # every layer's (K, V) of one block

BLOCK = 16


def block_hashes(encoded: Any, keys: list[tuple[str, int]], pad_id: int, tpt: int, xattn: bool) -> list[bytes]:
    """The chained hash of each full block of `encoded`'s prompt (its `keys`: each image's content key)."""
    owner: list[tuple[str, int]] = []  # sample-local tile → (image key, tile within the image)
    for key, n in keys:
        owner += [(key, t) for t in range(n)]
    tokens: list[Any] = []
    pads = 0
    for token in encoded.input_ids:
        if token == pad_id:  # the run of pads of decoder tile decoder_tiles[pads // tpt]
            key, t = owner[encoded.decoder_tiles[pads // tpt]]
            tokens.append((key, t * tpt + pads % tpt))
            pads += 1
        else:
            tokens.append(token)
    h = hashlib.blake2b(repr([k for k, _ in keys] if xattn else []).encode(), digest_size=16).digest()
    out = []
    for i in range(len(tokens) // BLOCK):
        s = slice(i * BLOCK, (i + 1) * BLOCK)
        ranges = (encoded.xattn_lo[s], encoded.xattn_hi[s]) if xattn else ()
        h = hashlib.blake2b(h + repr((tokens[s], ranges)).encode(), digest_size=16).digest()
        out.append(h)
    return out


def reusable(encoded: Any, pad_id: int, tpt: int, tokens: int) -> int:
    """The most of `tokens` cached tokens a prefill can start after: at least one token is left to compute, and
    the cut does not fall inside a tile's run of image-pad tokens (its features enter whole)."""
    ids = encoded.input_ids
    start = max(min(tokens, len(ids) - 1), 0)
    pads = sum(1 for t in ids[:start] if t == pad_id)
    while start > 0 and ids[start] == pad_id and pads % tpt:
        start -= 1
        pads -= ids[start] == pad_id
    return start


class PrefixCache:
    """Per block hash: every layer's (K, V) of the block [kvH, BLOCK, hd], least recently used evicted first."""

    def __init__(self, max_bytes: int, metrics: EngineMetrics) -> None:
        self.metrics = metrics
        self._blocks: ByteLRU[Block] = ByteLRU(
            max_bytes, lambda kv: sum(k.numel() * k.element_size() * 2 for k, _ in kv)
        )

    def match(self, hashes: list[bytes]) -> int:
        """Leading blocks held (marked as recently used)."""
        n = 0
        for h in hashes:
            if self._blocks.get(h) is None:
                break
            n += 1
        return n

    def load(self, pool: KVPool, row: int, hashes: list[bytes], tokens: int) -> None:
        """The first `tokens` positions of `row` from the cached blocks of `hashes`."""
        for i, h in enumerate(hashes[: -(-tokens // BLOCK)]):
            n = min(BLOCK, tokens - i * BLOCK)
            for layer, (k, v) in zip(pool.layers, self._blocks[h], strict=True):
                layer.write(row, i * BLOCK, k[:, :n], v[:, :n])  # type: ignore[union-attr]

    def store(self, pool: KVPool, row: int, hashes: list[bytes]) -> None:
        """Keep the full prompt blocks of `row` not held yet."""
        for i, h in enumerate(hashes):
            if h in self._blocks:
                continue
            cols = slice(i * BLOCK, (i + 1) * BLOCK)
            kv = [(layer.k[row, :, cols].clone(), layer.v[row, :, cols].clone()) for layer in pool.layers]  # type: ignore[union-attr]
            if not self._blocks.put(h, kv):
                break
        self.metrics.gauges["prefix_cache_bytes"] = self._blocks.bytes
