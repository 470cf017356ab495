"""The running batch of the serving engine: per-row KV cache, attention mask and cross-attention state.

Continuous batching needs two operations that ``model.generate`` never does: *join* (rows prefilled at a
later step enter a batch whose cache is longer or shorter) and *leave* (finished or cancelled rows drop out).
Rows are left padded, as in ``generate``: the attention mask marks real positions and the model derives each
row's positions from it, so a row's logits do not depend on how much padding sits in front of it.

For NVLM-X/H every row keeps the cross-attention memory and the K/V that each block computed from it in the
row's own prefill (``XAttnState``). Joining pads the memory axis; a row with no image gets ``memory_len`` 0,
which the blocks turn into an exact identity (its row mask is 0), as if the blocks were skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nvlm.models.xattn import XAttnState


def _pad_left(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad `x` at the front of `dim` to `size`."""
    extra = size - x.shape[dim]
    if extra <= 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [extra, 0]
    return F.pad(x, pad)


def _pad_right(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    extra = size - x.shape[dim]
    if extra <= 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return F.pad(x, pad)


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(getattr(layer, "is_sliding", False) for layer in layers):
        # a documented limit, not a stub: sliding-window layers keep a rolling K/V that rows cannot be joined on
        raise ValueError(
            "the serving engine needs a transformers DynamicCache without sliding-window "
            "layers (per-row joins and leaves pad and slice each layer's K/V); serve an LLM with full attention "
            "in every layer, or use model.generate / nvlm chat for this one"
        )
    return layers


def _empty_state(b: int, like: XAttnState) -> XAttnState:
    """A state for `b` rows that have no image: zero memory, memory_len 0 (the blocks leave them unchanged)."""
    mem = like.memory.new_zeros(b, like.memory.shape[1], like.memory.shape[2])
    kv = {i: (k.new_zeros(b, *k.shape[1:]), v.new_zeros(b, *v.shape[1:])) for i, (k, v) in like.kv.items()}
    return XAttnState(memory=mem, memory_len=like.memory_len.new_zeros(b), kv=kv)


def _cat_states(a: XAttnState | None, na: int, b: XAttnState | None, nb: int) -> XAttnState | None:
    if a is None and b is None:
        return None
    if a is None:
        assert b is not None
        a = _empty_state(na, b)
    if b is None:
        b = _empty_state(nb, a)
    m = max(a.memory.shape[1], b.memory.shape[1])
    kv = {}
    for i in set(a.kv) | set(b.kv):
        if i not in a.kv or i not in b.kv:  # cannot happen while every block runs on every image prefill
            raise RuntimeError(f"cross-attention block {i} has K/V for only part of the batch")
        (ka, va), (kb, vb) = a.kv[i], b.kv[i]
        kv[i] = (
            torch.cat([_pad_right(ka, 2, m), _pad_right(kb, 2, m)]),
            torch.cat([_pad_right(va, 2, m), _pad_right(vb, 2, m)]),
        )
    return XAttnState(
        memory=torch.cat([_pad_right(a.memory, 1, m), _pad_right(b.memory, 1, m)]),
        memory_len=torch.cat([a.memory_len, b.memory_len]),
        kv=kv,
    )


@dataclass
class RunningBatch:
    """Rows being decoded: `cache` (DynamicCache, [B, kvH, T, hd] per layer), `mask` [B, T], `state`."""

    cache: Any = None
    mask: torch.Tensor | None = None
    state: XAttnState | None = None

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def join(self, cache: Any, mask: torch.Tensor, state: XAttnState | None) -> None:
        """Append rows prefilled together (their cache, mask and x-attn state) after the current rows."""
        if self.mask is None:
            self.cache, self.mask, self.state = cache, mask, state
            return
        t = max(self.mask.shape[1], mask.shape[1])
        for mine, new in zip(_layers(self.cache), _layers(cache), strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, 2, t), _pad_left(new.keys, 2, t)])
            mine.values = torch.cat([_pad_left(mine.values, 2, t), _pad_left(new.values, 2, t)])
        self.state = _cat_states(self.state, self.size, state, mask.shape[0])
        self.mask = torch.cat([_pad_left(self.mask, 1, t), _pad_left(mask, 1, t)])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order); trim padding columns and memory that no remaining row uses."""
        if not rows or self.mask is None:
            self.cache = self.mask = self.state = None
            return
        idx = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[idx]
        start = int((mask.sum(0) > 0).nonzero()[0]) if bool(mask.any()) else 0  # first column any row uses
        self.mask = mask[:, start:]
        for layer in _layers(self.cache):
            layer.keys = layer.keys[idx, :, start:]
            layer.values = layer.values[idx, :, start:]
        if self.state is not None:
            s = self.state
            lens = s.memory_len[idx.to(s.memory_len.device)]
            if not bool((lens > 0).any()):  # no image left: the blocks are skipped, as in generate
                self.state = None
                return
            m = int(lens.max())
            self.state = XAttnState(
                memory=s.memory[idx, :m],
                memory_len=lens,
                kv={i: (k[idx, :, :m], v[idx, :, :m]) for i, (k, v) in s.kv.items()},
            )

    def grow(self) -> torch.Tensor:
        """Extend the mask by one real column (the token about to be fed) and return it."""
        if self.mask is None:
            raise RuntimeError("grow() on an empty batch")
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return self.mask
