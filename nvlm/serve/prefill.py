"""The engine's prefill steps (``nvlm.serve.engine.Engine`` runs them): new rows are prefilled together as one
left-padded batch; a request whose prompt starts with blocks the prefix cache holds is prefilled alone from its
first uncached token; a prompt longer than ``max_prefill_tokens`` is prefilled a chunk per step in a runner of
its own, so the running rows keep decoding between its chunks (chunked prefill), and joins them after the last.
Each new row's first token is sampled here; the encoder cache gives the images' features where it holds them,
and for NVLM-X/H each block's K/V of a sample's image memory: new rows whose memory K/V it holds are prefilled
as a batch of their own that skips the blocks' K/V projections (a chunked prompt projects them at its first
chunk only, in its runner).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from nvlm.inference.kv_cache import BlockKV, stack_memory_kv
from nvlm.inference.runner import ModelRunner
from nvlm.serve.encoder_cache import EncoderCache, memory_key
from nvlm.serve.logprobs import prompt_logprobs
from nvlm.serve.metrics import EngineMetrics
from nvlm.serve.output import OutputProcessor
from nvlm.serve.prefix_cache import BLOCK, PrefixCache, reusable
from nvlm.serve.request import Request
from nvlm.serve.scheduler import chunk_end


class PrefillSteps:
    """The prefill half of the engine's step (a mixin: the engine holds the state named here)."""

    model: Any
    processor: Any
    runner: ModelRunner
    output: OutputProcessor
    metrics: EngineMetrics
    encoder_cache: EncoderCache | None
    prefix_cache: PrefixCache | None
    max_prefill_tokens: int
    _admitted: int
    _chunk: tuple[Request, Any, int, ModelRunner] | None
    _finish_rows: Callable[[list[tuple[Request, str, str]]], None]  # the engine's: release rows, report them

    def _prefill(self, reqs: list[Request]) -> None:
        """New rows: those with cached prompt blocks one by one from their first uncached token, the others
        as one left-padded batch; then every new row's first token."""
        t0 = time.perf_counter()
        now = time.monotonic()
        for r in reqs:
            r.t_admit = now
        samples = [r.to_prefill() for r in reqs]
        starts = [self._cached_tokens(r, s) for r, s in zip(reqs, samples, strict=True)]
        long = len(samples[0].input_ids) - starts[0] > self.max_prefill_tokens
        if len(reqs) == 1 and long and reqs[0].params.prompt_logprobs is None:
            return self._start_chunks(reqs[0], samples[0], starts[0])
        fresh = [i for i, start in enumerate(starts) if start == 0]
        hits = [i for i, start in enumerate(starts) if start > 0]
        known = {i: self._known_kv(reqs[i], samples[i]) for i in fresh}  # memory K/V the encoder cache holds
        groups = [g for g in ([i for i in fresh if known[i]], [i for i in fresh if not known[i]]) if g]
        first = self.runner.n
        logits = []
        for g in groups:  # rows with their memory K/V known, then the others: one left-padded batch each
            kv = [k for i in g if (k := known[i]) is not None] or None  # all rows of g, or none
            logits.append(self._prefill_batch([reqs[i] for i in g], [samples[i] for i in g], kv))
        for i in hits:
            logits.append(self._extend(reqs[i], samples[i], starts[i]))
        rows = [reqs[i] for g in groups for i in g] + [reqs[i] for i in hits]  # in the runner's row order
        tokens, host = self.output.sample(torch.cat(logits), rows)
        self.runner.feed(first, tokens)
        if self.prefix_cache is not None:
            for j, r in enumerate(rows):
                self.prefix_cache.store(self.runner.kv, first + j, r.block_hashes)
        computed = sum(len(s.input_ids) for s in samples) - sum(starts)
        self.metrics.count("prefill_tokens_computed", computed)
        self._admitted = 0
        self.metrics.observe_step("prefill", time.perf_counter() - t0, computed)
        self._finish_rows(self.output.advance(rows, host))

    def _prefill_batch(self, reqs: list[Request], samples: list[Any], known: list[BlockKV] | None) -> torch.Tensor:
        """One left-padded prefill → the rows' last logits [B, vocab] (and prompt logprobs where asked). `known`:
        every row's memory K/V from the encoder cache (else the blocks project them, and the cache keeps them)."""
        batch = self.processor.collate(samples, padding_side="left")
        cache = self.encoder_cache
        feats = cache.features(self.model, samples, [r.image_keys for r in reqs]) if cache is not None else None
        scored = [r.params.prompt_logprobs is not None and r.prompt_logprobs is None for r in reqs]
        kv = stack_memory_kv(known, batch["memory_index"].shape[1]) if known else None
        first = self.runner.n
        # every position's logits only when a row scores its prompt ([B, T, vocab]; else [B, 1, vocab])
        logits = self.runner.prefill(batch, list(reqs), all_logits=any(scored), features=feats, memory_kv=kv)
        if cache is not None and known is None:
            for j, (r, sample) in enumerate(zip(reqs, samples, strict=True)):
                cache.keep_memory_kv(self._memory_key(r, sample), self.runner.memory.row(first + j))
        width = batch["input_ids"].shape[1]
        for i, r in enumerate(reqs):
            if scored[i]:  # left padded: row i's prompt is its last prompt_tokens positions
                rows = logits[i, width - r.prompt_tokens :]
                r.prompt_logprobs = prompt_logprobs(rows, r.encoded.input_ids, r.params.prompt_logprobs or 0)
        return logits[:, -1]

    def _memory_key(self, r: Request, sample: Any) -> Any:
        return memory_key(sample, r.image_keys) if self.model.xattn else None

    def _known_kv(self, r: Request, sample: Any) -> BlockKV | None:
        """`r`'s memory K/V per block when the encoder cache holds them (None: not held, no cache, no memory)."""
        cache = self.encoder_cache
        return cache.memory_kv(self._memory_key(r, sample)) if cache is not None else None

    def _cached_tokens(self, r: Request, sample: Any) -> int:
        """Leading prompt tokens whose KV the prefix cache holds and a prefill can start after (0: none)."""
        if self.prefix_cache is None or not r.block_hashes or r.params.prompt_logprobs is not None:
            return 0
        blocks = self.prefix_cache.match(r.block_hashes)
        start = reusable(sample, self.processor.pad_id, self.processor.tokens_per_tile, blocks * BLOCK)
        self.metrics.count("prefix_cache_queries", r.prompt_tokens)
        self.metrics.count("prefix_cache_hits", start)
        return start

    def _extend(
        self, r: Request, sample: Any, start: int, end: int | None = None, runner: ModelRunner | None = None
    ) -> torch.Tensor:
        """`r`'s prefill of tokens start … end−1 (default: to the end) into `runner` (default: the engine's),
        after the prefix cache's blocks when `r` has no row there yet → logits [1, vocab]."""
        runner = runner or self.runner
        batch = self.processor.collate([sample])
        end = end or len(sample.input_ids)
        pad, tpt = self.processor.pad_id, self.processor.tokens_per_tile
        before = sum(1 for t in sample.input_ids[:start] if t == pad) // tpt  # tiles whose pads come earlier
        upto = sum(1 for t in sample.input_ids[:end] if t == pad) // tpt
        rest = {
            "input_ids": batch["input_ids"][:, start:end],  # no attention mask: one row, no padding
            "decoder_tiles": batch["decoder_tiles"][before:upto],
            "xattn_lo": batch["xattn_lo"][:, start:end],
            "xattn_hi": batch["xattn_hi"][:, start:end],
            "memory_index": batch["memory_index"],
            "memory_tag_ids": batch["memory_tag_ids"],
        }
        new = r not in runner.owners  # else a later chunk: the runner has the row's memory K/V
        known = self._known_kv(r, sample) if new else None
        feats = None
        # tiles this part needs: its decoder tiles', and a new row's memory (K/V known here are not sent to
        # tensor-parallel followers, which project their own)
        if rest["decoder_tiles"].numel() or (self.model.xattn and new):
            rest["pixel_values"] = batch["pixel_values"]
            if self.encoder_cache is not None and r.image_keys:
                feats = self.encoder_cache.features(self.model, [sample], [r.image_keys])
        load = None
        if new and start > 0:
            cache, hashes = self.prefix_cache, r.block_hashes
            assert cache is not None
            load = lambda row: cache.load(runner.kv, row, hashes, start)  # noqa: E731
        logits = runner.extend(rest, r, start, load, feats, known)[:, -1]
        if new and known is None and self.encoder_cache is not None:
            self.encoder_cache.keep_memory_kv(self._memory_key(r, sample), runner.memory.row(runner.owners.index(r)))
        return logits

    def _start_chunks(self, r: Request, sample: Any, start: int) -> None:
        """A prompt longer than `max_prefill_tokens`: prefilled a chunk per step into a runner of its own, so the
        running rows keep decoding between chunks (chunked prefill); it joins them after its last chunk."""
        self._chunk = (r, sample, start, ModelRunner(self.model))
        self._next_chunk([r])

    def _next_chunk(self, reqs: list[Request]) -> None:
        assert self._chunk is not None
        r, sample, start, runner = self._chunk
        t0 = time.perf_counter()
        end = chunk_end(
            sample.input_ids, start, self.max_prefill_tokens, self.processor.pad_id, self.processor.tokens_per_tile
        )
        logits = self._extend(r, sample, start, end, runner)
        self.metrics.count("prefill_tokens_computed", end - start)
        self.metrics.observe_step("prefill", time.perf_counter() - t0, end - start)
        if end < len(sample.input_ids):
            self._chunk = (r, sample, end, runner)
            return
        self._chunk = None
        first = self.runner.n
        self.runner.adopt(runner, r)
        tokens, host = self.output.sample(logits, [r])
        self.runner.feed(first, tokens)
        if self.prefix_cache is not None:
            self.prefix_cache.store(self.runner.kv, first, r.block_hashes)
        self._finish_rows(self.output.advance([r], host))
