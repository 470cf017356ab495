"""Sequence packing: several samples in one row, with no attention across them (paper §5 data pipeline).

Samples are placed greedily (first fit, longest first) into rows of at most `max_len` tokens. In a packed
row, position ids restart at 0 for each sample; with no padding mask, transformers builds the
block-diagonal causal mask from those restarts, so a token attends only within its own sample. Each
sample's cross-attention memory is appended to the row's memory and its [lo, hi) ranges are shifted by
its offset, so it sees only its own images. The loss is the same token-level mean as unpacked.
"""

from __future__ import annotations

from typing import Any

import torch

from nvlm.data.processor import Encoded, memory_tensors


def should_pack(pack: bool | None, stage: str, micro_batch_size: int) -> bool:
    """`pack` when given; by default pack SFT micro-batches of several samples: padding them to the longest
    wasted 2.6-2.8x in real tokens/s on long-tailed lengths (``nvlm bench packing``), while one sample per
    micro-batch has no padding to remove. The packed row's attention is block-diagonal causal: per packed sample
    on CPU (``nvlm.models.packed_attention``), a dense mask under SDPA on GPU, variable-length under
    flash_attention_2 / flex_attention (``train.attn``)."""
    return pack if pack is not None else (stage == "sft" and micro_batch_size > 1)


def pack_greedy(lengths: list[int], max_len: int) -> list[list[int]]:
    """Indices of samples per row: first-fit decreasing. A sample longer than `max_len` is an error
    (truncation drops such samples before packing)."""
    too_long = [i for i, n in enumerate(lengths) if n > max_len]
    if too_long:
        raise ValueError(f"samples {too_long[:5]} are longer than the packing length {max_len}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_len - lengths[i])
    return rows


def collate_packed(rows: list[list[Encoded]], pad_id: int, tokens_per_tile: int) -> dict[str, Any]:
    """Rows of samples → one right-padded batch with restarting position ids and no attention mask."""
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "position_ids", "xattn_lo", "xattn_hi")}
    memory: list[list[tuple[str, Any]]] = []
    decoder_tiles: list[int] = []
    pixel_values: list[torch.Tensor] = []
    tile_offset = 0
    for row in rows:
        ids, labels, pos, lo, hi, mem = [], [], [], [], [], []
        mem_offset = 0
        for s in row:
            n = len(s.input_ids)
            ids += s.input_ids
            labels += s.labels or [-100] * n
            pos += list(range(n))
            lo += [v + mem_offset for v in s.xattn_lo]  # shift into this row's memory; empty ranges stay empty
            hi += [v + mem_offset for v in s.xattn_hi]
            mem += [(k, tile_offset + v if k == "tile" else v) for k, v in s.memory]
            decoder_tiles += [tile_offset + t for t in s.decoder_tiles]
            mem_offset += s.memory_len
            if s.pixel_values is not None:
                pixel_values.append(s.pixel_values)
                tile_offset += s.pixel_values.shape[0]
        pad = width - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["labels"].append(labels + [-100] * pad)
        out["position_ids"].append(pos + list(range(pad)))  # the padding tail is a sample of its own
        out["xattn_lo"].append(lo + [0] * pad)
        out["xattn_hi"].append(hi + [0] * pad)
        memory.append(mem)
    batch: dict[str, Any] = {k: torch.tensor(v) for k, v in out.items()}
    batch.update(
        attention_mask=None,
        decoder_tiles=torch.tensor(decoder_tiles, dtype=torch.long),
        pixel_values=torch.cat(pixel_values) if pixel_values else None,
        **memory_tensors(memory, tokens_per_tile, tile_offset),
    )
    return batch
