"""The paper's task formats (Appendix E, Figure 11) as conversation builders.

Boxes are written as ``<box>(x0,y0),(x1,y1)</box>`` with coordinates normalised to 0–1000 of the image's
width and height, and OCR items as ``<ref>text</ref><box>…</box>``, as in NVLM's training data.
"""

from __future__ import annotations

import random
from typing import Any

from nvlm.data.formats import Conversation
from nvlm.data.processor import IMAGE_PLACEHOLDER

CAPTION_PROMPTS = (
    "Give a brief description of the image.",
    "Describe the image briefly.",
    "Write a short caption for the image.",
    "Summarize the visual content of the image.",
)
VQA_SHORT = "Answer the question using a single word or phrase."

Box = tuple[float, float, float, float]


def box(b: Box, width: int, height: int) -> str:
    """Pixel box (left, top, right, bottom) → ``<box>(x0,y0),(x1,y1)</box>`` in 0–1000 coordinates."""
    x0, y0, x1, y1 = b
    n = [round(1000 * v / s) for v, s in ((x0, width), (y0, height), (x1, width), (y1, height))]
    n = [min(1000, max(0, v)) for v in n]
    return f"<box>({n[0]},{n[1]}),({n[2]},{n[3]})</box>"


def _conv(image: Any, question: str, answer: str, system: str | None = None) -> Conversation:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"},
        {"role": "assistant", "content": answer},
    ]
    return Conversation(messages, [image])


def caption(image: Any, text: str, rng: random.Random | None = None) -> Conversation:
    prompt = (rng or random.Random(0)).choice(CAPTION_PROMPTS)
    return _conv(image, prompt, text)


def vqa(image: Any, question: str, answer: str, short: bool = False, system: str | None = None) -> Conversation:
    return _conv(image, f"{question}\n{VQA_SHORT}" if short else question, answer, system)


def grounded_ocr(image: Any, size: tuple[int, int], region: Box, text: str) -> Conversation:
    return _conv(image, f"Detect the text within this section: {box(region, *size)}.", text)


def referring(image: Any, size: tuple[int, int], text: str, region: Box) -> Conversation:
    return _conv(image, f'Identify the text "{text}" in the image and provide the coordinates.', box(region, *size))


def ocr(image: Any, size: tuple[int, int], items: list[tuple[str, Box]]) -> Conversation:
    answer = "".join(f"<ref>{t}</ref>{box(b, *size)}" for t, b in items)
    return _conv(image, "Apply Optical Character Recognition (OCR) to the provided image.", answer)


def transcription(image: Any, text: str) -> Conversation:
    return _conv(image, "Extract the text from the provided document.", text)


def latex(image: Any, formula: str) -> Conversation:
    return _conv(image, "Please write out the expression of the formula in the image using LaTeX format.", formula)


def text_only(question: str, answer: str, system: str | None = None) -> Conversation:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]
    return Conversation(messages, [])
