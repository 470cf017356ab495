"""The engine's scheduler: which waiting requests are prefilled next, and which running ones must leave when the
KV budget runs out (nano-vllm's and vLLM's split: the scheduler decides, the runner computes, the output
processor turns tokens into events).

A step admits waiting requests, oldest first, while there are free rows, the prompt-token budget of one prefill
(``max_prefill_tokens``; the first request is always admitted) and the KV budget hold. The runner keeps rows
dense, so a decoding step attends over rows × (longest row + 1) positions: that product must stay within
``max_kv_tokens``. When a decoding step would go past it, the newest rows are preempted (vLLM's recompute
preemption): they go back to the front of the queue and are prefilled again later with the tokens they had
generated, continuing where they stopped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from nvlm.serve.request import Request


class Scheduler:
    """The waiting queue and the admission and preemption rules (the running rows are the runner's)."""

    def __init__(self, max_batch: int, max_prefill_tokens: int, max_kv_tokens: int | None) -> None:
        self.max_batch, self.max_prefill_tokens, self.max_kv_tokens = max_batch, max_prefill_tokens, max_kv_tokens
        self.waiting: deque[Request] = deque()

    def fits(self, rows: int, width: int) -> bool:
        """Whether `rows` rows attending over `width` positions stay within the KV budget."""
        return self.max_kv_tokens is None or rows * width <= self.max_kv_tokens

    def admit(self, lengths: list[int], on_cancelled: Callable[[Request, str], None]) -> list[Request]:
        """Waiting requests to prefill now, given the running rows' `lengths` (cancelled ones are finished
        through `on_cancelled` and skipped)."""
        out: list[Request] = []
        budget = self.max_prefill_tokens
        width = max(lengths, default=0) + 1
        while self.waiting and len(lengths) + len(out) < self.max_batch:
            r = self.waiting[0]
            if r.cancelled:
                self.waiting.popleft()
                on_cancelled(r, "cancelled")
                continue
            n = len(r.encoded.input_ids) + len(r.output_ids)  # a preempted request prefills what it generated too
            if out and n > budget:
                break
            w = max(width, n + 1)
            if (lengths or out) and not self.fits(len(lengths) + len(out) + 1, w):
                break
            budget -= n
            width = w
            out.append(self.waiting.popleft())
        return out

    def preempt(self, owners: list[Request], lengths: list[int]) -> list[Request]:
        """Rows to take out before the next decoding step so that it fits the KV budget (never the last row);
        they go back to the front of the queue, the most recently admitted first in line after the others."""
        out: list[Request] = []
        order = sorted(range(len(owners)), key=lambda i: (owners[i].t_admit, i), reverse=True)  # newest first
        kept = set(range(len(owners)))
        for i in order:
            width = max(lengths[j] for j in kept) + 1
            if len(kept) == 1 or self.fits(len(kept), width):
                break
            kept.discard(i)
            out.append(owners[i])
        for r in out:  # the oldest of them ends up first in the queue
            self.waiting.appendleft(r)
        return out


def chunk_end(ids: list[int], start: int, size: int, pad_id: int, tpt: int) -> int:
    """Where a prefill chunk of at most `size` tokens from `start` ends: not inside a tile's run of image-pad
    tokens (a tile's features enter whole), so a chunk ends before such a run, or after it when the run alone
    is longer than `size`."""
    end = min(start + size, len(ids))
    pads = sum(1 for t in ids[:end] if t == pad_id)
    back = end
    while back > start and back < len(ids) and ids[back] == pad_id and pads % tpt:
        back -= 1
        pads -= ids[back] == pad_id
    if back > start:
        return back
    while end < len(ids) and ids[end] == pad_id and sum(1 for t in ids[:end] if t == pad_id) % tpt:
        end += 1
    return end
