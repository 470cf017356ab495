"""Training data in the formats users already have → one `Conversation`, and ChatML with loss masks (§5, App. E).

Accepted records (JSON list or JSONL, one record a line):
- LLaVA: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n…"}], "image": "a.png" | [...]}``
  (an image with no ``<image>`` in the text goes in front of the first user turn, as LLaVA does);
- OpenAI / ShareGPT messages: ``{"messages": [{"role": "user", "content": [{"type": "text", "text": …},
  {"type": "image_url", "image_url": {"url": "a.png" | "file://…" | "data:image/png;base64,…"}}]}]}``;
- text-only conversations in either form;
- one instruction and its answer, as text-only SFT sets release them: ``instruction`` (+ ``input``) / ``output``
  (Alpaca, MathInstruct), ``instruction`` / ``response`` (UltraInteract, Magicoder), ``query`` / ``response``
  (MetaMathQA), ``question`` / ``answer`` (Orca-Math), ``problem`` / ``solution`` (Magicoder OSS), with an
  optional ``system``.
Image paths are relative to `image_root` (default: the data file's folder). Loss goes only on assistant
content and its ``<|im_end|>`` (``chatml_segments``), never on system/user text, image tokens or tags.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvlm.data.processor import IM_END, IM_START, IMAGE_PLACEHOLDER, check_user_text

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataFormatError(ValueError):
    """A record is malformed; the message names the file and line."""


class BadRecord(DataFormatError):
    """One record could not be read or used; the message names the file (shard) and the record (line, key, row)."""


@dataclass
class Conversation:
    messages: list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": str with <image>}]
    images: list[Any] = field(default_factory=list)  # resolved paths, bytes or PIL images, in placeholder order
    source: str = ""  # "file:line", for error messages and skip counts

    @property
    def has_images(self) -> bool:
        return bool(self.images)


def parse_record(
    obj: Any, image_root: str | os.PathLike = ".", where: str = "<record>", images: list[Any] | None = None
) -> Conversation:
    """Detect the record's format and return a `Conversation`; `DataFormatError` says what is wrong.
    `images` (e.g. the image bytes of a Parquet row or a WebDataset sample) replace the record's own image
    references, in placeholder order; with no placeholder they go in front of the first user turn."""
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:
        conv = _from_llava(obj, Path(image_root), where)
    elif "messages" in obj:
        conv = _from_openai(obj, Path(image_root), where)
    elif pair_fields(obj) is not None:
        conv = _from_pair(obj, where)
    else:
        raise DataFormatError(
            f"{where}: expected a 'conversations' (LLaVA) or 'messages' (OpenAI) field, or an instruction and its "
            f"answer ({', '.join('/'.join(p) for p in PAIRS)}), got keys {sorted(obj)}"
        )
    n = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in conv.messages)
    if images is not None:
        if images and not n:
            place_images(conv.messages, len(images))
            n = len(images)
        conv.images = list(images)
    if n != len(conv.images):
        raise DataFormatError(f"{where}: {n} {IMAGE_PLACEHOLDER} placeholder(s) but {len(conv.images)} image(s)")
    if not any(m["role"] == "assistant" for m in conv.messages):
        raise DataFormatError(f"{where}: no assistant turn, so nothing to learn from")
    conv.source = where
    return conv


PAIRS = (("instruction", "output"), ("instruction", "response"), ("query", "response"), ("question", "answer"),
         ("problem", "solution"))  # fmt: skip


def pair_fields(keys: Any) -> tuple[str, str] | None:
    """The (prompt, answer) fields of an instruction record with these keys (or columns), if any."""
    return next((p for p in PAIRS if p[0] in keys and p[1] in keys), None)


def _from_pair(obj: dict, where: str) -> Conversation:
    """An instruction and its answer → one user turn (the instruction, then any ``input``) and one answer."""
    fields = pair_fields(obj)
    assert fields is not None
    prompt, answer = obj[fields[0]], obj[fields[1]]
    if not isinstance(prompt, str) or not isinstance(answer, str):
        raise DataFormatError(f"{where}: '{fields[0]}' and '{fields[1]}' must be strings")
    if obj.get("image") or obj.get("images"):  # an image would be silently dropped: say so instead
        raise DataFormatError(f"{where}: an instruction record with an image; write it as a LLaVA conversation")
    extra = obj.get("input")
    if isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    system = obj.get("system")
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    return Conversation([*messages, {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])


def _from_llava(obj: dict, root: Path, where: str) -> Conversation:
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(f"{where}: 'conversations' must be a non-empty list")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise DataFormatError(f"{where}: turn {k} needs 'from' in {sorted(_ROLES)} and a string 'value'")
        messages.append({"role": _ROLES[turn["from"]], "content": turn["value"]})
    image = obj.get("image", obj.get("images"))
    images = [] if image is None else [image] if isinstance(image, str) else list(image)
    if images and not any(IMAGE_PLACEHOLDER in m["content"] for m in messages):
        place_images(messages, len(images))
    return Conversation(messages, [str(root / p) for p in images])


def place_images(messages: list[dict[str, str]], n: int) -> None:
    """`n` placeholders in front of the first user turn (LLaVA's rule for images the text does not place)."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), 0)
    messages[first_user]["content"] = f"{IMAGE_PLACEHOLDER}\n" * n + messages[first_user]["content"]


def _from_openai(obj: dict, root: Path, where: str) -> Conversation:
    messages, images = [], []
    for k, msg in enumerate(obj["messages"]):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise DataFormatError(f"{where}: message {k} needs a 'role' of system, user or assistant")
        content = msg.get("content")
        if isinstance(content, str):
            messages.append({"role": msg["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise DataFormatError(f"{where}: message {k} 'content' must be a string or a list of parts")
        text = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise DataFormatError(f"{where}: message {k} has a text part without a string 'text'")
                text.append(part["text"])
            elif kind in ("image_url", "image"):
                ref = part.get(kind)
                ref = ref.get("url") if kind == "image_url" and isinstance(ref, dict) else ref
                if not isinstance(ref, str) or (kind == "image_url" and not isinstance(part.get(kind), dict)):
                    shape = '{"type": "image_url", "image_url": {"url": "a.png"}}' if kind == "image_url" else \
                        '{"type": "image", "image": "a.png"}'  # fmt: skip
                    raise DataFormatError(
                        f"{where}: message {k} has a malformed {kind} part "
                        f"({json.dumps(part)[:80]}); write it as {shape}"
                    )
                images.append(_image_ref(ref, root, where))
                text.append(IMAGE_PLACEHOLDER + "\n")
            else:
                raise DataFormatError(
                    f"{where}: message {k} has a part of unknown type {kind!r} (use 'text', 'image_url' or 'image')"
                )
        messages.append({"role": msg["role"], "content": "".join(text)})
    return Conversation(messages, images)


def _image_ref(ref: str, root: Path, where: str) -> Any:
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        if ";base64" not in header:
            raise DataFormatError(f"{where}: data URL must be base64 ('data:image/png;base64,…')")
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError as e:
            raise DataFormatError(f"{where}: bad base64 in data URL ({e})") from e
    if ref.startswith(("http://", "https://")):
        raise DataFormatError(f"{where}: remote image URLs are not fetched; download {ref} and give a local path")
    return str(root / ref.removeprefix("file://"))


def read_records(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Iterator[Conversation]:
    """Conversations from a .json (a list) or .jsonl file; a malformed line raises naming file and line."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataFormatError(f"{path}: data file not found; check data.sources[].path") from None
    if not stat.S_ISREG(mode):
        raise DataFormatError(f"{path}: not a regular file (a folder, device or FIFO); give a .json or .jsonl file")
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".json":
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}: not valid JSON ({e})") from e
            for i, obj in enumerate(items if isinstance(items, list) else [items]):
                yield parse_record(obj, root, f"{path}[{i}]")
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line") from e
            except RecursionError:
                raise DataFormatError(f"{path}:{n}: JSON nested too deeply; flatten that record") from None
            yield parse_record(obj, root, f"{path}:{n}")


def chatml_segments(conv: Conversation, system: str | None = None) -> list[tuple[str, bool]]:
    """ChatML as (text, trainable) segments: only assistant content and its <|im_end|> carry loss.
    ControlTokenError (a ValueError: the blend counts the sample as bad) if a content holds a ChatML string."""
    messages = conv.messages
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    segments = []
    for m in messages:
        train = m["role"] == "assistant"
        check_user_text(m["content"], what=f"{conv.source or 'conversation'}: {m['role']} message")
        segments += [(f"{IM_START}{m['role']}\n", False), (m["content"] + IM_END, train), ("\n", False)]
    return segments


def to_llava(conv: Conversation) -> dict[str, Any]:
    back = {"user": "human", "assistant": "gpt", "system": "system"}
    out: dict[str, Any] = {"conversations": [{"from": back[m["role"]], "value": m["content"]} for m in conv.messages]}
    if conv.images:
        out["image"] = [str(p) for p in conv.images]
    return out


def to_openai(conv: Conversation) -> dict[str, Any]:
    images = iter(conv.images)
    messages: list[dict[str, Any]] = []
    for m in conv.messages:
        pieces = m["content"].split(IMAGE_PLACEHOLDER + "\n")
        if len(pieces) == 1:
            messages.append({"role": m["role"], "content": m["content"]})
            continue
        parts: list[dict[str, Any]] = []
        for k, text in enumerate(pieces):
            if text:
                parts.append({"type": "text", "text": text})
            if k < len(pieces) - 1:
                parts.append({"type": "image_url", "image_url": {"url": str(next(images))}})
        messages.append({"role": m["role"], "content": parts})
    return {"messages": messages}
