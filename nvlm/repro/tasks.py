"""Tasks where NVLM's design choices can matter (paper §4.2 tile tags, Appendix C dense OCR), drawn with the
demo's primitives (:mod:`nvlm.demo.draw`) at its 32 px tile scale.

* ``tile_read`` (Tables 1–2): 3 digits, each near the centre of a different tile of a 3–6 tile image of varying
  aspect ratio (3×1, 1×3, 2×2, 3×2, 2×3, so the tile grid changes); answer the digits in reading order (tiles
  row by row). The digits are ~0.6 tile high: whole in their full-resolution tile, shrunk 3× in the thumbnail.
* ``tile_mark`` (Tables 1–2): one black disc inside one tile of a 2–6 tile image; answer the tile's number in
  reading order. The thumbnail is square, so only the tiles (and their tags) tell the grid.
* ``ocr_line`` (Appendix C): a line of 6 small digits across a 3×1 image, two per tile, each in its own half
  tile (so each sits under its own tile tokens and none straddles a tile border); transcribe it.

Held-out only, out of the demo's ``count`` distribution (1–5 shapes on 1–6 tile canvases, RL vs SFT):
``count_wide``: 1–5 shapes on 4×2 and 3×3 canvases, more tiles than any training image (the tiler fits them into
its 6, so the shapes also appear smaller); ``count_many``: 6–7 shapes, counts no training answer holds.

Deterministic per (seed, split, task); the held-out split draws from its own random stream and any held-out
image whose pixels equal a training image's is redrawn, so the splits are disjoint.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from nvlm.demo import draw

TILE = draw.TILE
DIGITS = "0123456789"
CAPTION_PROMPT = "Describe the image briefly."


@dataclass(frozen=True)
class RTask:
    name: str
    question: str
    chance: float  # accuracy of a uniform guess among the generator's answers
    max_new_tokens: int  # one digit per token (the demo tokenizer splits digits) + end of turn
    char_chance: float = 0.1  # per-character accuracy of a uniform guess (a digit: 1 in 10)


READ_GRIDS = ((3, 1), (1, 3), (2, 2), (3, 2), (2, 3))  # (cols, rows): 3-6 tiles, 5 aspect ratios
MARK_GRIDS = ((2, 1), (1, 2), (3, 1), (1, 3), (2, 2), (3, 2), (2, 3))
MARK_CHANCE = sum(1 / (c * r) for c, r in MARK_GRIDS) / len(MARK_GRIDS)  # one-character answers
TASKS = {
    "tile_read": RTask("tile_read", "What digits are written in the image, in reading order?", 1 / 1000, 5),
    "tile_mark": RTask("tile_mark", "Which tile holds the disc?", MARK_CHANCE, 3, char_chance=MARK_CHANCE),
    "ocr_line": RTask("ocr_line", "Transcribe the text in the image.", 1 / 10**6, 8),
}


def _glyph(rng: random.Random, digit: str, frac: tuple[float, float]) -> Image.Image:
    return draw.glyph_mask(digit, rng.randint(round(frac[0] * TILE), round(frac[1] * TILE)), 1)


def _in_tile(rng: random.Random, mask: Image.Image, col: int, row: int, jitter: int = 2) -> tuple[int, int]:
    # near the tile's centre, clamped so the ink never crosses the tile's border
    x = col * TILE + min(max((TILE - mask.width) // 2 + rng.randint(-jitter, jitter), 0), max(TILE - mask.width, 0))
    y = row * TILE + min(max((TILE - mask.height) // 2 + rng.randint(-jitter, jitter), 0), max(TILE - mask.height, 0))
    return x, y


def _background(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(200, 255), rng.randint(200, 255), rng.randint(200, 255))


def sample_tile_read(rng: random.Random) -> draw.Scene:
    cols, rows = rng.choice(READ_GRIDS)
    tiles = sorted(rng.sample(range(cols * rows), 3))  # row-major tile numbers, so sorted = reading order
    digits = [rng.choice(DIGITS) for _ in tiles]
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    ops = []
    for t, d in zip(tiles, digits):
        mask = _glyph(rng, d, (0.55, 0.7))
        ops.append(("glyph", _in_tile(rng, mask, t % cols, t // cols), mask, ink))
    where = ", ".join(f"{d} in tile {t + 1}" for t, d in zip(tiles, digits))
    return draw.Scene(cols * TILE, rows * TILE, _background(rng), "".join(digits), f"digits {where}", ops)


def sample_tile_mark(rng: random.Random) -> draw.Scene:
    cols, rows = rng.choice(MARK_GRIDS)
    t = rng.randrange(cols * rows)
    r = rng.randint(4, 7)
    cx = (t % cols) * TILE + rng.randint(r + 2, TILE - r - 3)
    cy = (t // cols) * TILE + rng.randint(r + 2, TILE - r - 3)
    op = ("ellipse", (cx - r, cy - r, cx + r, cy + r), draw.DISC)
    return draw.Scene(cols * TILE, rows * TILE, _background(rng), str(t + 1), f"a black disc in tile {t + 1}", [op])


def sample_ocr_line(rng: random.Random) -> draw.Scene:
    cols, per_tile = 3, 2
    n = cols * per_tile
    digits = [rng.choice(DIGITS) for _ in range(n)]
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    slot = TILE // per_tile  # each digit in its own half tile: no glyph straddles a tile border
    ops = []
    for i, d in enumerate(digits):
        mask = _glyph(rng, d, (0.6, 0.7))
        x = i * slot + min(max((slot - mask.width) // 2 + rng.randint(-1, 1), 0), max(slot - mask.width, 0))
        y = (TILE - mask.height) // 2 + rng.randint(-3, 3)
        ops.append(("glyph", (x, max(0, y)), mask, ink))
    text = "".join(digits)
    return draw.Scene(cols * TILE, TILE, _background(rng), text, f"a line of digits {' '.join(text)}", ops)


WIDE_GRIDS = ((4, 2), (3, 3))  # 8 and 9 tiles: beyond the demo's 1-6 tile grids (and the tiler's 6)
MANY_GRIDS = ((3, 1), (2, 2), (3, 2))  # room for 7 shapes of the demo's sizes


def sample_count_beyond(rng: random.Random, counts: tuple[int, int], grids: tuple[tuple[int, int], ...]) -> draw.Scene:
    """The demo's count scene (its shape sizes, colours and no-touch rule), with its count and canvas drawn from
    other ranges."""
    cols, rows = rng.choice(grids)
    w, h, bg = cols * TILE, rows * TILE, _background(rng)
    n = rng.randint(*counts)
    placed: list[tuple[int, int, int]] = []
    while len(placed) < n:  # rejection sampling: n shapes of radius <= 5 fit these canvases easily
        r = rng.randint(round(0.1 * TILE), round(0.16 * TILE))
        cx, cy = rng.randint(r, w - 1 - r), rng.randint(r, h - 1 - r)
        if all(abs(cx - x) > r + s + 2 or abs(cy - y) > r + s + 2 for x, y, s in placed):
            placed.append((cx, cy, r))
    ops = []
    for cx, cy, r in placed:  # every shape fills exactly its box [cx-r, cx+r]², as the demo's
        kind, fill = rng.choice(draw.SHAPES), draw.PALETTE[rng.choice(list(draw.PALETTE))]
        box = (cx - r, cy - r, cx + r, cy + r)
        ops.append(
            ("ellipse", box, fill) if kind == "circle"
            else ("rectangle", box, fill) if kind == "square"
            else ("polygon", [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill)
        )  # fmt: skip
    return draw.Scene(w, h, bg, str(n), f"{n} shapes", ops)


COUNT_QUESTION = "How many shapes are there?"  # the demo's count question
COUNT_OOD = {
    "count_wide": ((1, 5), WIDE_GRIDS, 1 / 5),  # (counts, canvases, chance: a uniform guess among 1-5)
    "count_many": ((6, 7), MANY_GRIDS, 1 / 7),  # a guess among 1-7
}


def generate_count_ood(data: Path, n: int, seed: int = 0) -> dict[str, int]:
    """Write ``test/count_wide.jsonl`` and ``test/count_many.jsonl`` (n items each) with their PNGs under `data`,
    in the demo's record layout; same arguments → same bytes."""
    for name, (counts, grids, _) in COUNT_OOD.items():
        for folder in (data / "images" / "test", data / "test"):
            folder.mkdir(parents=True, exist_ok=True)
        rng = stream(seed, "test", name)
        recs = []
        for i in range(n):
            scene = sample_count_beyond(rng, counts, grids)
            rel = f"images/test/{name}_{i:06d}.png"
            draw.render(scene).save(data / rel, format="PNG", compress_level=1)
            recs.append(_record(f"test_{name}_{i:06d}", COUNT_QUESTION, scene.answer, name, rel))
        _write(data / "test" / f"{name}.jsonl", recs)
    return {name: n for name in COUNT_OOD}


SAMPLERS = {"tile_read": sample_tile_read, "tile_mark": sample_tile_mark, "ocr_line": sample_ocr_line}


def stream(seed: int, split: str, task: str) -> random.Random:
    # string seeds are hashed with SHA-512 by `random`: stable across processes, one stream per (seed, split, task)
    return random.Random(f"nvlm-repro/{seed}/{split}/{task}")


def _record(rid: str, question: str, answer: str, task: str, image: str) -> dict:
    turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    return {"id": rid, "image": image, "conversations": turns, "task": task}


def _pixels(im: Image.Image) -> str:
    return hashlib.sha256(f"{im.mode}{im.size}".encode() + im.tobytes()).hexdigest()


def generate(out: Path, tasks: tuple[str, ...], n_train: int, n_test: int, seed: int = 0) -> dict[str, int]:
    """Write ``{train,test}/{task}.jsonl``, ``train/{task}_caption.jsonl``, ``train/{task}_text_caption.jsonl``
    (text only) and the PNGs under `out` (the demo's
    data folder layout, image paths relative to it). Same arguments → same bytes. Returns the counts."""
    counts = {}
    for task in tasks:
        seen: set[str] = set()
        for split, n in (("train", n_train), ("test", n_test)):
            (out / split).mkdir(parents=True, exist_ok=True)
            (out / "images" / split).mkdir(parents=True, exist_ok=True)
            rng = stream(seed, split, task)
            recs: list[dict] = []
            caps: list[dict] = []
            while len(recs) < n:
                scene = SAMPLERS[task](rng)
                im = draw.render(scene)
                h = _pixels(im)
                if split == "test" and h in seen:  # equal to a training image: redraw
                    continue
                seen.add(h)
                rel = f"images/{split}/{task}_{len(recs):06d}.png"
                im.save(out / rel, format="PNG", compress_level=1)
                recs.append(_record(f"{split}_{task}_{len(recs):06d}", TASKS[task].question, scene.answer, task, rel))
                caps.append(_record(f"caption_{task}_{len(caps):06d}", CAPTION_PROMPT, scene.caption, "caption", rel))
            _write(out / split / f"{task}.jsonl", recs)
            if split == "train":
                _write(out / "train" / f"{task}_caption.jsonl", caps)
            counts[f"{split}/{task}"] = len(recs)
        # text only: the caption prompt answered by a described scene (own stream, no image), for the text LLM,
        # as the demo's text_caption.jsonl: the frozen LLM must already write such sentences for stage 1 to align
        rng = stream(seed, "text_caption", task)
        described = [
            {
                "id": f"text_caption_{task}_{i:06d}",
                "conversations": [
                    {"from": "human", "value": CAPTION_PROMPT},
                    {"from": "gpt", "value": SAMPLERS[task](rng).caption},
                ],
                "task": "text_caption",
            }
            for i in range(n_train)
        ]
        _write(out / "train" / f"{task}_text_caption.jsonl", described)
    return counts


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def normalise(text: str) -> str:
    return "".join(text.split()).rstrip(".").lower()


def score(prediction: str, answer: str) -> bool:
    """Exact match after dropping whitespace and a trailing period (digits may come back spaced)."""
    return normalise(prediction) == normalise(answer)
