"""The prompts of ``nvlm bench serve``: deterministic questions, about half of them with one drawn image."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

QUESTIONS = [
    "What is in the image?",
    "Describe the picture.",
    "How many circles are there?",
    "Which bar is the tallest?",
    "Read the number.",
    "What color is the square?",
]


def make_prompts(n: int, image_ratio: float, seed: int = 0) -> list[tuple[str, list[Image.Image]]]:
    """`n` deterministic (question, images) pairs; about `image_ratio` of them carry one drawn image."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        images = []
        if rng.random() < image_ratio:
            images.append(draw_image(rng, *rng.choice([(448, 448), (896, 448), (300, 600), (1000, 800)])))
        out.append((QUESTIONS[i % len(QUESTIONS)], images))
    return out


def draw_image(rng: random.Random, w: int, h: int) -> Image.Image:
    """A `w`×`h` image of four coloured ellipses on a coloured ground, drawn from `rng`."""
    im = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x, y = rng.randrange(w), rng.randrange(h)
        d.ellipse([x, y, x + w // 5, y + h // 5], fill=tuple(rng.randrange(256) for _ in range(3)))
    return im
