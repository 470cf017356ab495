"""KV that outlives a step: the LLM's keys and values per layer for every row being generated, and for NVLM-X/H
each gated cross-attention block's K/V of the row's image memory (paper §4.3), computed once per image.

Row r holds one request: its positions 0 … len_r−1 sit at columns 0 … len_r−1 of each layer's buffers
[R, kvH, C, hd]. Because a row's column is its position, nothing moves when rows of other lengths join or
leave, and a decoding step writes each row's new keys at its own column (one indexed write per layer) and hands
attention a view of the first W columns of the first n rows (W: the longest row + 1; shorter rows are masked).
Rows stay dense (0 … n−1): a leaving row's place is taken by the last row (one row's K/V copied), never a
gather of the batch. Buffers grow by doubling when a row or a column more is needed, so a step allocates
nothing that grows with the context.

``KVPool`` is a transformers ``Cache`` whose layers the LLM's own attention calls; what a forward's ``update``
does (write a left-padded prefill, one token per row, or a row's next chunk) is set by the runner before the
forward (``plan``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from nvlm.models.xattn import XAttnState

BlockKV = dict[int, tuple[torch.Tensor, torch.Tensor]]  # gated block → (K, V) of an image memory, [B, kvH, M, hd]


@dataclass
class Plan:
    """What the next forward writes. prefill: rows `first` … of `lengths` real tokens, left padded to `width`;
    decode: one token for each of rows 0 … n−1 at column `pos[r]`, attention over `width` columns;
    extend: row `first` gets `width` new tokens after its `start` cached ones."""

    kind: str = "idle"
    first: int = 0
    lengths: list[int] = field(default_factory=list)
    width: int = 0
    start: int = 0
    pos: torch.Tensor | None = None  # decode: [n] long, each row's new column (on the model's device)
    rows: torch.Tensor | None = None  # decode: arange(n)


def _grow(buf: torch.Tensor | None, like: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`buf` [R, kvH, C, hd] with at least `rows` rows and `cols` columns (doubled, old content kept)."""
    if buf is not None and buf.shape[0] >= rows and buf.shape[2] >= cols:
        return buf
    r0, c0 = (0, 0) if buf is None else (buf.shape[0], buf.shape[2])
    new = like.new_zeros(max(rows, 2 * r0), like.shape[1], max(cols, 2 * c0), like.shape[3])
    if buf is not None:
        new[:r0, :, :c0] = buf
    return new


class PoolLayer(CacheLayerMixin):
    """One LLM layer's keys and values for all rows of a ``KVPool``."""

    is_sliding = False

    def __init__(self, pool: KVPool) -> None:
        super().__init__()
        self.pool = pool
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pool.plan
        rows, cols = self.pool.capacity
        self.k = _grow(self.k, key_states, rows, cols)
        self.v = _grow(self.v, value_states, rows, cols)
        self.is_initialized = True
        if p.kind == "prefill":  # the prompt attends to itself only: write its real columns, return it as is
            t = key_states.shape[2]
            for j, n in enumerate(p.lengths):  # row j's tokens are its last n columns (left padding)
                self.k[p.first + j, :, :n] = key_states[j, :, t - n :]
                self.v[p.first + j, :, :n] = value_states[j, :, t - n :]
            return key_states, value_states
        if p.kind == "decode":  # [n, kvH, 1, hd]: row r's key at its own column pos[r]
            self.k[p.rows, :, p.pos] = key_states[:, :, 0]
            self.v[p.rows, :, p.pos] = value_states[:, :, 0]
            n = key_states.shape[0]
            return self.k[:n, :, : p.width], self.v[:n, :, : p.width]
        if p.kind == "extend":  # [1, kvH, t, hd] after the row's cached tokens
            r, end = p.first, p.start + key_states.shape[2]
            self.k[r, :, p.start : end] = key_states[0]
            self.v[r, :, p.start : end] = value_states[0]
            return self.k[r : r + 1, :, :end], self.v[r : r + 1, :, :end]
        raise RuntimeError(f"KVPool: a forward wrote keys without a plan ({p.kind})")

    def get_seq_length(self) -> int:
        p = self.pool.plan
        return {"decode": p.width - 1, "extend": p.start}.get(p.kind, 0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def write(self, row: int, col: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Columns col … of `row` from K, V [kvH, t, hd] (a prefix cache's blocks), growing the buffers."""
        rows, cols = self.pool.capacity
        t = k.shape[1]
        self.k = _grow(self.k, k[None], max(rows, row + 1), max(cols, col + t))
        self.v = _grow(self.v, v[None], max(rows, row + 1), max(cols, col + t))
        self.k[row, :, col : col + t] = k
        self.v[row, :, col : col + t] = v

    def move(self, src: int, dst: int, n: int) -> None:
        if self.k is not None and self.v is not None:
            self.k[dst, :, :n] = self.k[src, :, :n]
            self.v[dst, :, :n] = self.v[src, :, :n]


class KVPool(Cache):
    """The LLM's KV for rows 0 … n−1 (``lengths`` on the host: counted, never read back from the device)."""

    def __init__(self, num_layers: int) -> None:
        self.plan = Plan()
        self.lengths: list[int] = []
        self.capacity = (0, 0)  # rows, columns every layer must hold for the next forward
        super().__init__(layers=[PoolLayer(self) for _ in range(num_layers)])

    def reserve(self, rows: int, cols: int) -> None:
        self.capacity = (max(rows, self.capacity[0]), max(cols, self.capacity[1]))

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s KV into row `dst` (which then holds what `src` held)."""
        for layer in self.layers:
            assert isinstance(layer, PoolLayer)
            layer.move(src, dst, self.lengths[src])
        self.lengths[dst] = self.lengths[src]


class MemoryKV:
    """Each gated block's K/V of each row's image memory [R, kvH, M, hd] and the rows' memory lengths."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lens: list[int] = []
        self._state: XAttnState | None = None  # rows 0 … n−1 as the blocks read them; rebuilt when rows change

    def write(self, first: int, state: XAttnState | None, lens: list[int]) -> None:
        """A prefill's rows: its state's row j → pool row first + j, with lens[j] memory tokens (0: no image)."""
        rows = first + len(lens)
        self.lens[first:rows] = lens
        self._state = None
        given = state.kv if state is not None else {}
        for i in set(self.kv) | set(given):
            k, v = given.get(i, (None, None))
            old_k, old_v = self.kv.get(i, (None, None))
            m = 0 if k is None else k.shape[2]  # the prefill's memory width (its longest row's)
            nk = _grow(old_k, k if k is not None else old_k, rows, m)  # type: ignore[arg-type]
            nv = _grow(old_v, v if v is not None else old_v, rows, m)  # type: ignore[arg-type]
            nk[first:rows].zero_(), nv[first:rows].zero_()  # rows with a shorter memory (or none) see zeros past it
            if k is not None and v is not None:
                nk[first:rows, :, :m], nv[first:rows, :, :m] = k, v
            self.kv[i] = (nk, nv)

    def row(self, r: int) -> BlockKV | None:
        """Row `r`'s K/V per block over its own memory, views [1, kvH, m, hd] (None: the row has no image)."""
        m = self.lens[r] if r < len(self.lens) else 0
        if m == 0 or not self.kv:
            return None
        return {i: (k[r : r + 1, :, :m], v[r : r + 1, :, :m]) for i, (k, v) in self.kv.items()}

    def move(self, src: int, dst: int) -> None:
        for k, v in self.kv.values():
            k[dst], v[dst] = k[src], v[src]
        self.lens[dst] = self.lens[src]
        self._state = None

    def truncate(self, n: int) -> None:
        del self.lens[n:]
        self._state = None

    def state(self, n: int) -> XAttnState | None:
        """The blocks' view of rows 0 … n−1: None when none has an image (the blocks are skipped, as for text)."""
        if self._state is None or self._state.memory_len.shape[0] != n:
            m = max(self.lens[:n], default=0)
            if m == 0 or not self.kv:
                return None
            k0 = next(iter(self.kv.values()))[0]
            # the memory itself is not kept (every block's K/V of it is): a [n, M, 0] stand-in gives its shape
            memory = k0.new_zeros(n, m, 0)
            lens = torch.tensor(self.lens[:n], device=k0.device)
            kv = {i: (k[:n, :, :m], v[:n, :, :m]) for i, (k, v) in self.kv.items()}
            self._state = XAttnState(memory=memory, memory_len=lens, kv=kv)
        return self._state


def stack_memory_kv(rows: list[BlockKV], width: int) -> BlockKV:
    """Per-row K/V per block ([1, kvH, m_j, hd] each) → the batch's [B, kvH, width, hd], zeros past a row's memory
    (what the blocks compute for a padded memory: no bias, and RMSNorm keeps a zero K zero)."""
    out: BlockKV = {}
    for i, (k0, _) in rows[0].items():
        k = k0.new_zeros(len(rows), k0.shape[1], width, k0.shape[3])  # [B, kvH, width, hd]
        v = torch.zeros_like(k)
        for j, row in enumerate(rows):
            m = row[i][0].shape[2]
            k[j, :, :m], v[j, :, :m] = row[i][0][0], row[i][1][0]
        out[i] = (k, v)
    return out
