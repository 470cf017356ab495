"""A KV cache whose keys and values are written into buffers made once per generation (``nvlm.inference.generate``).

transformers' ``DynamicLayer`` grows each layer's keys and values with ``torch.cat`` at every decoding step, so
step n copies all n cached positions again: O(n²) bytes moved over a generation, 33–52 µs a layer per step for
two cats against 17 µs for two in-place writes on a small model here, and more the longer the answer. ``GrowingLayer``
allocates room for the prompt and every new token at the first write (doubling if a caller goes past that),
writes each step's keys and values in place and hands the attention a view of the filled prefix: the same
values, so the same logits, bitwise.

Its one user is ``nvlm.inference.generate`` (``model.generate`` and ``model.chat``); the serving engine keeps
transformers' own cache. Anything that replaces a layer's ``keys``/``values`` itself (``crop``,
``batch_select_indices``, offloading) leaves a tensor that is no longer a prefix of the buffer; the next write
notices and copies it into a fresh buffer, so every cache operation of transformers keeps working.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """One layer's keys and values [B, kvH, T, hd] as views of preallocated [B, kvH, capacity, hd] buffers."""

    def __init__(self, capacity: int = 0) -> None:
        super().__init__()
        self.capacity = capacity  # positions to allocate at the first write (prompt + new tokens)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, new = self.get_seq_length(), key_states.shape[-2]
        if not self._holds(key_states, n + new):
            self._reallocate(key_states, value_states, n, n + new)
        assert self._k is not None and self._v is not None
        self._k.narrow(2, n, new).copy_(key_states)  # [B, kvH, new, hd] into positions n … n+new-1
        self._v.narrow(2, n, new).copy_(value_states)
        self.keys, self.values = self._k[:, :, : n + new], self._v[:, :, : n + new]  # views: no copy
        return self.keys, self.values

    def _holds(self, key_states: torch.Tensor, needed: int) -> bool:
        """Whether the cached keys are still the prefix of this layer's buffer and `needed` positions fit."""
        k = self._k
        if k is None or needed > k.shape[2] or k.shape[:2] != key_states.shape[:2] or k.dtype != key_states.dtype:
            return False
        if self.get_seq_length() == 0:
            return True
        keys: torch.Tensor = self.keys  # type: ignore[assignment]  # set by the first update
        return keys.data_ptr() == k.data_ptr() and keys.stride() == k.stride()

    def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, n: int, needed: int) -> None:
        old = 0 if self._k is None else self._k.shape[2]
        capacity = max(needed, self.capacity if self._k is None else 2 * old)
        b, h, _, d = key_states.shape
        k = key_states.new_empty(b, h, capacity, d)
        v = value_states.new_empty(b, h, capacity, value_states.shape[-1])
        if n:  # what the cache holds now (possibly rewritten by crop, row selection, …)
            k[:, :, :n] = self.keys  # type: ignore[assignment]
            v[:, :, :n] = self.values  # type: ignore[assignment]
        self._k, self._v = k, v

    def reset(self) -> None:
        self._k = self._v = None
        super().reset()


def preallocated_cache(llm_config: Any, capacity: int) -> Cache | None:
    """A cache of ``GrowingLayer`` with room for `capacity` positions per layer, for LLMs whose every layer
    is full attention; None (the LLM makes its own ``DynamicCache``) for sliding-window or other layer kinds."""
    config = llm_config.get_text_config()
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    if (
        any(kind != "full_attention" for kind in kinds)
        or getattr(config, "sliding_window", None)
        and (config.model_type == "mistral" or getattr(config, "use_sliding_window", False))
    ):
        return None
    return Cache(layers=[GrowingLayer(capacity) for _ in range(config.num_hidden_layers)])
