"""Log-probabilities of tokens under the model, and their OpenAI shapes (completions and chat).

A position's log-probabilities are ``log_softmax`` of the model's logits at the position before it, as a forward
pass computes them: before temperature, top-p, the image-pad mask or any ``min_tokens`` mask, so a client scores
text against the model itself (what lm-evaluation-harness's log-likelihood tasks need).
"""

from __future__ import annotations

from typing import Any

import torch

from nvlm.serve.request import TokenLogprob

MAX_LOGPROBS = 20  # alternatives per position a request may ask for


def pick(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """One position: `logprobs` [vocab] (already log-softmaxed), the chosen `token`, its `k` best alternatives."""
    top = logprobs.topk(k) if k else None
    alts = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    return TokenLogprob(token, float(logprobs[token]), alts)


def step_logprobs(logits: torch.Tensor, tokens: list[int], ks: list[int | None]) -> list[TokenLogprob | None]:
    """A step's rows: `logits` [B, vocab] raw, row i's new token and how many alternatives (None: not asked)."""
    rows = [i for i, k in enumerate(ks) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(ks)
    if rows:
        lp = logits[rows].float().log_softmax(-1)  # [rows, vocab]
        for j, i in enumerate(rows):
            out[i] = pick(lp[j], tokens[i], ks[i] or 0)
    return out


def prompt_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob | None]:
    """A prompt's: `logits` [T, vocab] at its T real positions; the first token has none (nothing before it)."""
    lp = logits[:-1].float().log_softmax(-1)  # [T-1, vocab]: position t predicts token t+1
    return [None] + [pick(lp[t], ids[t + 1], k) for t in range(len(ids) - 1)]


class Pieces:
    """Token id → its text as the tokenizer decodes it alone (OpenAI's ``tokens``), cached. `lock` is the
    engine's tokenizer lock (a fast tokenizer refuses concurrent use)."""

    def __init__(self, tokenizer: Any, lock: Any) -> None:
        self.tok, self.lock, self.cache = tokenizer, lock, dict[int, str]()

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            with self.lock:
                self.cache[token] = self.tok.decode([token])
        return self.cache[token]


def completion_logprobs(entries: list[TokenLogprob | None], ids: list[int], pieces: Pieces, start: int = 0) -> dict:
    """The legacy completions ``logprobs`` object for `ids` (prompt ids first when echoed): ``tokens``,
    ``token_logprobs``, ``top_logprobs`` (the alternatives and the token itself) and ``text_offset`` (each
    token's start in the returned text, counted from `start`)."""
    tokens, offsets, pos = [], [], start
    for t in ids:
        s = pieces(t)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
    top: list[dict[str, float] | None] = []
    for e in entries:
        if e is None:
            top.append(None)
        else:
            alts: dict[str, float] = {}
            for t, lp in [*e.top, (e.token, e.logprob)]:  # best first: tokens that decode alike keep the best
                alts.setdefault(pieces(t), lp)
            top.append(alts)
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(entries: list[TokenLogprob], pieces: Pieces) -> dict:
    """Chat completions' ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}``."""

    def one(token: int, logprob: float) -> dict:
        s = pieces(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    return {
        "content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries],
        "refusal": None,
    }
