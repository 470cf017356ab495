"""Incremental detokenisation with stop strings, as vLLM v1's detokenizer: each new token decodes only a short
window of ids (from ``prefix`` to the end), never the whole answer again, so a token costs the same at any
answer length. The text equals ``tokenizer.decode(all ids, skip_special_tokens=True)`` cut at the first stop
string; text that may still turn into a stop string, or ends in an incomplete UTF-8 sequence, is held back from
streams (``safe_len``).
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to, until its next bytes arrive


class Detokenizer:
    """One answer's text, token by token."""

    def __init__(self, tokenizer: Any, stop: list[str] | tuple[str, ...], stop_ids: list[int] | set[int]) -> None:
        self.tok, self.stop, self.stop_ids = tokenizer, list(stop), set(stop_ids)
        self.ids: list[int] = []
        self.text = ""
        self.finished = False
        self.prefix = self.read = 0  # ids[prefix:read] decode to the end of `text`; ids[read:] are not in it yet
        self.longest_stop = max((len(s) for s in self.stop), default=0)

    def add(self, token: int) -> None:
        """Append one token: an end-of-sequence id finishes the answer (and adds no text)."""
        if self.finished:
            return
        if token in self.stop_ids:
            self.flush()
            self.finished = True
            return
        self.ids.append(token)
        self._decode_window(flush=False)

    def flush(self) -> None:
        """Add what is held back because it ends in an incomplete character (the answer is over)."""
        if self.read < len(self.ids) and not self.finished:
            self._decode_window(flush=True)

    def _decode_window(self, flush: bool) -> None:
        decode = self.tok.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        new = decode(self.ids[self.prefix :], skip_special_tokens=True)[len(before) :]
        if not new:
            return
        start, text = len(self.text), self.text + new
        cut = self._stop_at(text, start)
        if cut >= 0:  # a stop string ends the answer, even where a character after it is incomplete
            self.text, self.finished = text[:cut], True
        elif flush or not new.endswith(REPLACEMENT):  # else wait for the character's next bytes
            self.text = text
            self.prefix, self.read = self.read, len(self.ids)

    def _stop_at(self, text: str, start: int) -> int:
        """Where the first stop string starts (-1: none). One can only end in the new text, so the search starts
        at `start` minus the longest stop string."""
        lo = max(0, start - self.longest_stop + 1)
        return min((i for i in (text.find(s, lo) for s in self.stop) if i >= 0), default=-1)

    def safe_len(self) -> int:
        """Length of the text that can be streamed now: all of it once finished, else without a trailing
        incomplete character or a suffix that may still become a stop string."""
        text = self.text
        if self.finished:
            return len(text)
        n = len(text.rstrip(REPLACEMENT))
        for s in self.stop:
            for k in range(min(len(s) - 1, n), 0, -1):
                if text[:n].endswith(s[:k]):
                    n -= k
                    break
        return n


def stop_ids(tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the tokenizer's eos and ChatML's ``<|im_end|>`` where it exists."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is not None and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return ids
