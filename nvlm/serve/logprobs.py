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


def pick(logprobs: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Rows of `logprobs` [N, vocab] (already log-softmaxed): row i's chosen `tokens[i]`, its log-probability
    and its `k` best alternatives, read in one gather and one top-k for all rows."""
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    if not k:
        return [TokenLogprob(t, v, []) for t, v in zip(tokens, chosen, strict=True)]
    top = logprobs.topk(k, dim=-1)
    ids, values = top.indices.tolist(), top.values.tolist()
    return [
        TokenLogprob(t, v, list(zip(i, x, strict=True))) for t, v, i, x in zip(tokens, chosen, ids, values, strict=True)
    ]


def step_logprobs(logits: torch.Tensor, tokens: list[int], ks: list[int | None]) -> list[TokenLogprob | None]:
    """A step's rows: `logits` [B, vocab] raw, row i's new token and how many alternatives (None: not asked)."""
    out: list[TokenLogprob | None] = [None] * len(ks)
    for k in {k for k in ks if k is not None}:  # rows asking the same number of alternatives together
        rows = [i for i, ki in enumerate(ks) if ki == k]
        lp = logits[rows].float().log_softmax(-1)  # [rows, vocab]
        for i, entry in zip(rows, pick(lp, [tokens[i] for i in rows], k), strict=True):
            out[i] = entry
    return out


def prompt_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob | None]:
    """A prompt's: `logits` [T, vocab] at its T real positions; the first token has none (nothing before it)."""
    lp = logits[:-1].float().log_softmax(-1)  # [T-1, vocab]: position t predicts token t+1
    return [None, *pick(lp, ids[1:], k)]


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
