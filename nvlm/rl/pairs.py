"""Preference pairs for DPO: JSONL in TRL's layout, read whole and checked line by line before training starts.

One pair a line (blank lines skipped):

- TRL's standard form: ``{"prompt": "<image>\\nWhat color?", "chosen": "red", "rejected": "blue",
  "images": ["a.png"]}`` (or ``"image": "a.png"``), one ``<image>`` placeholder per image;
- TRL's conversational form and OpenAI-style messages: ``"prompt"`` (or ``"messages"``) a list of
  ``{"role", "content"}`` messages whose content is a string or parts (``{"type": "text", "text": …}``,
  ``{"type": "image"}`` for the next of ``images``, ``{"type": "image_url", "image_url": {"url": "a.png"}}``), and
  ``"chosen"`` / ``"rejected"`` each a string or a list holding one assistant message.

Image paths are relative to the file's folder (or ``image_root``). A pair is the prompt encoded once, rendered as
ChatML up to ``<|im_start|>assistant\\n``, and each answer's ids with its ``<|im_end|>`` (as SFT labels answers).
The stream hands out pairs in a seeded order, a new permutation each epoch (several files: each file's share of
an epoch is its ``weight``'s), position p to process p mod N; the
position is the whole of its state, so a resumed run reads the pairs it would have read.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvlm.data.formats import Conversation, DataFormatError, chatml_segments, parse_record
from nvlm.data.processor import IM_END, IM_START, IMAGE_PLACEHOLDER, Encoded
from nvlm.errors import UserError


@dataclass
class PairRecord:
    prompt: Conversation  # the messages before the answer, with their images
    chosen: str
    rejected: str
    where: str  # "file:line"


@dataclass
class Pair:
    index: int  # the record's place among all pairs read: the key of its cached reference log-probs
    prompt: Encoded
    chosen: list[int]
    rejected: list[int]


def _answer(value: Any, key: str, where: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content") if value[0].get("role") == "assistant" else None
    if isinstance(value, list):  # content parts: text only
        parts = [p["text"] for p in value if isinstance(p, dict) and isinstance(p.get("text"), str)]
        value = "".join(parts) if len(parts) == len(value) else None
    if not isinstance(value, str):
        raise UserError(
            f'{where}: \'{key}\' must be a string or [{{"role": "assistant", "content": "…"}}]; fix that line'
        )
    return value


def parse_pair(obj: Any, root: Path, where: str) -> PairRecord:
    """One JSON object → a `PairRecord`; UserError naming the line and what to write instead."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: a pair must be a JSON object with prompt, chosen and rejected; fix that line")
    missing = [k for k in ("chosen", "rejected") if k not in obj] + (
        [] if {"prompt", "messages"} & set(obj) else ["prompt"]
    )
    if missing:
        raise UserError(f"{where}: missing {missing}; a pair needs prompt (or messages), chosen and rejected")
    prompt = obj.get("prompt", obj.get("messages"))
    image = obj.get("images", obj.get("image"))
    images = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise UserError(f"{where}: 'images' must be a list of paths (or 'image' one path); fix that line")
    if isinstance(prompt, str):
        messages: Any = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = [_bare_images(m) for m in prompt]
    else:
        raise UserError(f"{where}: 'prompt' must be a string or a list of messages; fix that line")
    chosen, rejected = _answer(obj["chosen"], "chosen", where), _answer(obj["rejected"], "rejected", where)
    record = {"messages": [*messages, {"role": "assistant", "content": chosen}]}
    given = [str(root / p) for p in images] if image is not None else None
    try:  # the conversation reader checks roles, parts, images against placeholders; the answer only stands in
        conv = parse_record(record, root, where, images=given)
    except DataFormatError as e:
        raise UserError(f"{e}; give one {IMAGE_PLACEHOLDER} per image and fix that line") from None
    conv.messages.pop()
    return PairRecord(conv, chosen, rejected, where)


def _bare_images(message: Any) -> Any:
    """TRL's ``{"type": "image"}`` parts (the image is in ``images``) → a placeholder text part."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message
    bare = {"type": "text", "text": IMAGE_PLACEHOLDER + "\n"}
    parts = [bare if isinstance(p, dict) and p == {"type": "image"} else p for p in message["content"]]
    return {**message, "content": parts}


def read_pairs(path: str | Path, image_root: str | Path | None = None) -> list[PairRecord]:
    """Every pair of a JSONL file, checked; UserError naming the file, the line and the fix."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the pair file ({e}); check data.sources[].path") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise UserError(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', e)}); fix or remove that line") from None
        out.append(parse_pair(obj, root, f"{path}:{n}"))
    if not out:
        raise UserError(f"{path}: no pairs; write one JSON object per line with prompt, chosen and rejected")
    return out


def encode_pair(processor: Any, record: PairRecord, index: int, system: str | None = None) -> Pair:
    """The prompt as ChatML up to the assistant's turn, and each answer's ids with its end-of-turn token."""
    segments = [*chatml_segments(record.prompt, system), (f"{IM_START}assistant\n", False)]
    try:
        prompt = processor.encode_segments(segments, record.prompt.images)
        answers = [processor.check_text(a, "answer") for a in (record.chosen, record.rejected)]
    except ValueError as e:  # a broken image, a control token in the text
        raise UserError(f"{record.where}: {e}") from None
    ids = [processor.tokenizer(a + IM_END, add_special_tokens=False)["input_ids"] for a in answers]
    return Pair(index, prompt, ids[0], ids[1])


def weighted_epoch(spans: list[tuple[int, int, float]], seed: str) -> list[int]:
    """One epoch of pair indices over several files, as many as all files hold, each file's share its weight's
    (``data.sources[].weight``, as SFT's blend; largest remainders round): file f's pairs ``spans[f] = (start,
    count, weight)`` in a seeded permutation, repeated when its share exceeds its count, then all shuffled."""
    total, weights = sum(n for _, n, _ in spans), sum(w for _, _, w in spans)
    exact = [total * w / weights for _, _, w in spans]
    quota = [int(e) for e in exact]
    by_remainder = sorted(range(len(spans)), key=lambda f: quota[f] - exact[f])
    for f in by_remainder[: total - sum(quota)]:
        quota[f] += 1
    order: list[int] = []
    for f, ((start, n, _), q) in enumerate(zip(spans, quota, strict=True)):
        own = list(range(start, start + n))
        random.Random(f"{seed}:{f}").shuffle(own)
        order += [own[k % n] for k in range(q)]
    random.Random(seed).shuffle(order)
    return order


class PairStream:
    """The pairs of every ``data.sources`` file for one process, in a seeded order, encoded as they are read.
    The trainer drives it as its sample stream (``batch``, ``state_dict``, ``load_state_dict``, ``close``)."""

    def __init__(self, sources: list[Any], processor: Any, system: str | None, seed: int, rank: int, world: int):
        read = [read_pairs(s.path, s.image_root) for s in sources]
        self.records = [r for rs in read for r in rs]
        starts = [sum(len(rs) for rs in read[:i]) for i in range(len(read))]
        self.spans = [(a, len(rs), float(s.weight)) for a, rs, s in zip(starts, read, sources, strict=True)]
        if sum(w for _, _, w in self.spans) <= 0:
            raise UserError("data.sources: every pair file has weight 0; give at least one a weight > 0")
        self.processor, self.system, self.seed, self.rank, self.world = processor, system, seed, rank, world
        self.position = 0
        self.counts: Counter[str] = Counter()
        self._epoch: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        if self._epoch[0] != epoch:  # one order per epoch, the same on every process and after a resume
            if len(self.spans) == 1:  # one file: a permutation of its pairs
                order = list(range(len(self.records)))
                random.Random(f"{self.seed}:{epoch}").shuffle(order)
            else:
                order = weighted_epoch(self.spans, f"{self.seed}:{epoch}")
            self._epoch = (epoch, order)
        return self._epoch[1]

    def batch(self, size: int) -> list[Pair]:
        """This process's next `size` pairs: positions p ≡ rank (mod world) from the current position on."""
        n, out = len(self.records), []
        for _ in range(size):
            p = self.position + (self.rank - self.position) % self.world
            i = self._order(p // n)[p % n]
            out.append(encode_pair(self.processor, self.records[i], i, self.system))
            self.position = p + 1
            self.counts["read"] += 1
            self.counts["used"] += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"blend": {"position": self.position}, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position, self.counts = state["blend"]["position"], Counter(state["counts"])

    def close(self) -> None: ...
