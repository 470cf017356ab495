"""The engine's output processor: a step's logits → each row's next token, its text and its events.

All rows are sampled at once on the logits' device (``nvlm.inference.sampler``: per-row temperature, top-p,
top-k and seed); the tokens come to the host in one copy per step. Each request's text grows by an incremental
detokenizer (``nvlm.inference.detok``), which decodes only the new token's window; stop strings, end-of-sequence
tokens, ``min_tokens``, ``ignore_eos`` and ``max_tokens`` end requests as ``model.generate`` does. Rows with a
grammar (structured outputs, ``nvlm.serve.grammar``) sample only what their grammar allows next, and end with
"stop" when it is complete; when no row has one, no mask is made.
"""

from __future__ import annotations

import threading
import time

import torch

from nvlm.inference.sampler import RowSettings, sample
from nvlm.serve.grammar import TokenMasks
from nvlm.serve.logprobs import step_logprobs
from nvlm.serve.metrics import EngineMetrics
from nvlm.serve.request import Event, Request


class OutputProcessor:
    """Samples rows' next tokens and turns them into events; finished requests are reported to `on_finish`."""

    def __init__(self, pad_id: int, stop_ids: list[int], tok_lock: threading.Lock, metrics: EngineMetrics) -> None:
        self.pad_id, self.stop_ids, self.tok_lock, self.metrics = pad_id, stop_ids, tok_lock, metrics
        self._settings: tuple[tuple[int, ...], RowSettings] | None = None  # for the last set of rows
        self._masks = TokenMasks()

    def settings(self, reqs: list[Request], device: torch.device) -> RowSettings:
        """The rows' sampling settings as tensors, made again only when the rows change."""
        key = tuple(id(r) for r in reqs)
        if self._settings is None or self._settings[0] != key:
            p = [r.params for r in reqs]
            rows = RowSettings.of(
                [x.temperature for x in p],
                [x.top_p for x in p],
                [x.top_k for x in p],
                [r.generator(device) for r in reqs],
                device,
            )
            self._settings = (key, rows)
        return self._settings[1]

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[torch.Tensor, list[int]]:
        """[k, vocab] logits of `reqs`' rows → their next tokens, on the device and on the host."""
        wanted = [r.params.logprobs if r.params.max_tokens else None for r in reqs]
        raw = logits.clone() if any(w is not None for w in wanted) else logits  # logprobs: the model's own
        logits[:, self.pad_id] = float("-inf")  # the image-pad token has no features to stand for
        early = [i for i, r in enumerate(reqs) if len(r.output_ids) < r.params.min_tokens]
        if early and self.stop_ids:  # no end-of-sequence token before min_tokens
            rows = torch.tensor(early, device=logits.device)[:, None]
            logits[rows, torch.tensor(self.stop_ids, device=logits.device)] = float("-inf")
        constrained = [(i, r.matcher) for i, r in enumerate(reqs) if r.matcher is not None]
        if constrained:  # after the masks above: the grammar may allow end-of-sequence, never the image pad
            self._masks.apply(logits, [i for i, _ in constrained], [m for _, m in constrained])
        tokens = sample(logits, self.settings(reqs, logits.device))
        host = tokens.tolist()  # the step's one device→host copy
        if any(w is not None for w in wanted):
            for r, entry in zip(reqs, step_logprobs(raw, host, wanted), strict=True):
                if entry is not None:
                    r.logprobs.append(entry)
        return tokens, host

    def advance(self, reqs: list[Request], tokens: list[int]) -> list[tuple[Request, str, str]]:
        """Give each request its new token and emit its text; returns (request, reason, last text) of those
        that finished (the engine releases their rows, then reports them)."""
        now = time.perf_counter()
        done: list[tuple[Request, str, str]] = []
        with self.tok_lock:  # once per step, not per row
            for r, tok in zip(reqs, tokens, strict=True):
                if r.params.max_tokens == 0:  # nothing to generate (a prompt scored, or an empty completion)
                    done.append((r, "length", ""))
                    continue
                r.output_ids.append(tok)
                if r.t_first is None:
                    r.t_first = now
                    self.metrics.ttft.observe(now - r.t_submit)
                r.t_last = now
                r.detok.add(tok)
                if r.matcher is not None:
                    r.matcher.accept(tok)
                ended = r.detok.finished or (r.matcher is not None and r.matcher.terminated)
                reason = "stop" if ended else "length" if len(r.output_ids) >= r.params.max_tokens else None
                if reason == "length":
                    r.detok.flush()
                safe = len(r.text) if reason else r.detok.safe_len()
                delta, r.sent = r.text[r.sent : safe], max(r.sent, safe)
                if reason:
                    done.append((r, reason, delta))
                else:
                    r.emit(Event(delta, [tok]))
        return done

    def finish(self, r: Request, reason: str, error: str | None = None, delta: str = "") -> None:
        r.finish_reason = reason
        self.metrics.finished(reason, r.prompt_tokens, len(r.output_ids), r.t_submit, r.t_first, r.t_last)
        r.emit(Event(delta, r.output_ids[-1:] if delta or reason in ("stop", "length") else [], reason, error))
