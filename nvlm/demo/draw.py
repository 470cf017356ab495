"""Scene sampling and drawing for the demo's synthetic vision tasks (used by :mod:`nvlm.demo.synthetic`).

Images are drawn at the native scale of the demo's dynamic tiling, where one tile is ``TILE`` = 32 px: a
canvas is 1-3 tiles wide and 1-2 tiles high (32-96 x 32-64 px), so NVLM's tiling cuts it into exactly
its own grid of 32 px tiles without resizing (plus a thumbnail when there is more than one tile). A task
first *samples* a :class:`Scene` (canvas, draw operations, answer, caption) and only then, if asked,
*renders* it; the text-only "text-scene" data reuse the sampled description without paying for pixels.

Shapes are drawn without anti-aliasing (Pillow's ``ImageDraw`` does none for polygons and ellipses), so
every shape pixel has exactly its palette colour: the tests recount shapes and recolour answers from the
pixels. Only glyphs are anti-aliased.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

TILE = 32
GRIDS: tuple[tuple[int, int], ...] = tuple((c, r) for r in (1, 2) for c in (1, 2, 3))  # (cols, rows)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 0),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
BAR_COUNTS = (3, 4, 5)  # drawn uniformly; the bars chance level is the mean of 1/n over these
DISC = (15, 15, 15)


@dataclass(frozen=True)
class ReadConfig:
    """Parameters of the ``read`` task: one large glyph, dark on light, inside one tile of a multi-tile image.

    The feasibility probe got 0.165 (chance 0.10) for one *thin* digit of 0.5-0.7 tile at a *random* place,
    and nothing for small multi-digit numbers. The defaults remove what made that hard, keeping the task
    reading (the answer is only in the glyph's shape):

    * ``font_frac`` 0.75-0.9 of a tile (font size 24-29 px; digits 18-22 px of ink high): the glyph covers
      about 3 x 2 of the tile's 4 x 4 ViT patches (patch 8) instead of sitting inside one or two.
    * ``stroke_width`` 1: bold strokes about 4 px wide that survive 8 px patches; 2 fills the counters of
      6, 8 and 9.
    * ``placement="tile"``, ``jitter_frac`` 0.08 (+-3 px): the glyph never straddles a tile border and sits
      near its tile's centre, so the randomly initialised ViT sees close to one template per class (as
      for centred MNIST digits); it is whole at full resolution in its tile, while the thumbnail shrinks
      it 2-3 x, so the detail is in the tiles. ``placement="anywhere"`` is the probe's harder variant.
    * ``min_tiles`` 2: always several tiles (plus thumbnail); the model must find the one with the glyph.
    * ``glyphs`` "0123456789": answers the demo's tokenizer already splits one digit per token; a smaller
      set of distinct capitals (e.g. "AEHKOX") is easier. Chance is ``1 / len(glyphs)``.

    Evidence (a proxy, not the demo: the same tiny ViT 64x2 + pixel shuffle + projector over the NVLM
    tiles, attention-pooled into a 10-way classifier, batch 32, one seed, 400 held-out images), held-out
    accuracy after 8k / 16k / 32k read images: these defaults 0.90 / 0.95 / 0.98; stroke 0 0.52 / 0.93 /
    0.98; jitter 0.2 0.62 / 0.84 / 0.93; placement "anywhere" 0.48 / 0.76 / 0.91; the probe's variant
    0.24 / 0.31 / 0.38. The real pipeline must also route the answer through the tiny LLM, so expect less.
    """

    glyphs: str = "0123456789"
    font_frac: tuple[float, float] = (0.75, 0.9)
    stroke_width: int = 1
    placement: str = "tile"  # "tile": inside one tile, near its centre; "anywhere": anywhere in the image
    jitter_frac: float = 0.08
    min_tiles: int = 2

    def __post_init__(self) -> None:
        if not self.glyphs or len(set(self.glyphs)) != len(self.glyphs) or any(g.isspace() for g in self.glyphs):
            raise ValueError(f"glyphs must be distinct non-space characters, got {self.glyphs!r}")
        if not 0.2 <= self.font_frac[0] <= self.font_frac[1] <= 1.0:
            raise ValueError(f"font_frac must be 0.2 <= lo <= hi <= 1.0, got {self.font_frac}")
        if self.placement not in ("tile", "anywhere"):
            raise ValueError(f"placement must be 'tile' or 'anywhere', got {self.placement!r}")
        if not 1 <= self.min_tiles <= 6 or self.stroke_width < 0 or not 0 <= self.jitter_frac < 0.5:
            raise ValueError("need 1 <= min_tiles <= 6, stroke_width >= 0 and 0 <= jitter_frac < 0.5")


@dataclass
class Scene:
    """What one image shows: canvas, draw operations in order, and the derived answer and caption."""

    width: int
    height: int
    background: tuple[int, int, int]
    answer: str
    caption: str
    ops: list[tuple] = field(default_factory=list)


@functools.lru_cache(maxsize=1024)
def glyph_mask(glyph: str, size: int, stroke_width: int) -> Image.Image:
    """The glyph's ink as an "L" mask cropped to its ink box (cached: the demo draws few distinct glyphs)."""
    font = ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable built-in font, no font files
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("the read task needs Pillow >= 10.1 with FreeType for ImageFont.load_default(size=)")
    pad = 2 * size
    canvas = Image.new("L", (pad, pad), 0)
    ImageDraw.Draw(canvas).text(
        (pad // 2, pad // 2), glyph, fill=255, font=font, anchor="mm", stroke_width=stroke_width, stroke_fill=255
    )
    box = canvas.getbbox()
    if box is None:
        raise ValueError(f"glyph {glyph!r} has no ink in Pillow's built-in font")
    return canvas.crop(box)


def render(scene: Scene) -> Image.Image:
    im = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(im)
    for op, *args in scene.ops:
        if op == "glyph":
            (x, y), mask, ink = args
            im.paste(ink, (x, y, x + mask.width, y + mask.height), mask)
        else:  # shape ops carry the ImageDraw method name, its geometry and the fill
            getattr(draw, op)(args[0], fill=args[1])
    return im


def _canvas(rng: random.Random, min_tiles: int = 1) -> tuple[int, int, tuple[int, int, int]]:
    cols, rows = rng.choice([g for g in GRIDS if g[0] * g[1] >= min_tiles])
    return cols * TILE, rows * TILE, (rng.randint(200, 255), rng.randint(200, 255), rng.randint(200, 255))


def _shape_op(kind: str, cx: int, cy: int, r: int, fill: tuple[int, int, int]) -> tuple:
    # Every shape fills exactly the integer box [cx-r, cx+r] x [cy-r, cy+r] (inclusive), which keeps the
    # non-overlap test for the count task exact.
    if kind == "circle":
        return ("ellipse", (cx - r, cy - r, cx + r, cy + r), fill)
    if kind == "square":
        return ("rectangle", (cx - r, cy - r, cx + r, cy + r), fill)
    return ("polygon", [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill)


def _where(cx: float, cy: float, w: int, h: int) -> str:
    col = ("left", "", "right")[min(2, int(3 * cx / w))]
    row = ("top", "", "bottom")[min(2, int(3 * cy / h))]
    name = f"{row} {col}".strip()
    return {
        "": "in the centre",
        "left": "on the left",
        "right": "on the right",
        "top": "at the top",
        "bottom": "at the bottom",
    }.get(name, f"in the {name}")


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def sample_color(rng: random.Random) -> Scene:
    w, h, bg = _canvas(rng)
    color, kind = rng.choice(list(PALETTE)), rng.choice(SHAPES)
    r = rng.randint(round(0.18 * TILE), round(0.3 * TILE))
    cx, cy = rng.randint(r, w - 1 - r), rng.randint(r, h - 1 - r)
    return Scene(
        w, h, bg, color, f"{_a(color)} {kind} {_where(cx, cy, w, h)}", [_shape_op(kind, cx, cy, r, PALETTE[color])]
    )


def sample_quadrant(rng: random.Random) -> Scene:
    w, h, bg = _canvas(rng)
    q = rng.randrange(4)
    # The disc keeps >= 8 % of the width (height) away from the vertical (horizontal) centre line, so
    # the answer is never a judgement call on a disc sitting on the line.
    mx, my = math.ceil(0.08 * w), math.ceil(0.08 * h)
    r = min(rng.randint(round(0.1 * TILE), round(0.18 * TILE)), (w // 2 - mx - 1) // 2, (h // 2 - my - 1) // 2)
    xs = (r, w // 2 - mx - r - 1) if q % 2 == 0 else (math.ceil(w / 2 + mx) + r, w - 1 - r)
    ys = (r, h // 2 - my - r - 1) if q < 2 else (math.ceil(h / 2 + my) + r, h - 1 - r)
    cx, cy = rng.randint(*xs), rng.randint(*ys)
    return Scene(w, h, bg, QUADRANTS[q], f"a black disc in the {QUADRANTS[q]}", [_shape_op("circle", cx, cy, r, DISC)])


def sample_count(rng: random.Random) -> Scene:
    w, h, bg = _canvas(rng)
    n = rng.randint(1, 5)
    while True:  # rejection sampling; 5 small shapes always fit in 32 x 32, so this ends quickly
        placed: list[tuple[int, int, int]] = []
        for _ in range(200):
            r = rng.randint(round(0.1 * TILE), round(0.16 * TILE))
            cx, cy = rng.randint(r, w - 1 - r), rng.randint(r, h - 1 - r)
            # >= 2 background pixels between the boxes of any two shapes: they never touch.
            if all(abs(cx - x) > r + s + 2 or abs(cy - y) > r + s + 2 for x, y, s in placed):
                placed.append((cx, cy, r))
                if len(placed) == n:
                    break
        if len(placed) == n:
            break
    shapes = [(rng.choice(SHAPES), rng.choice(list(PALETTE))) for _ in placed]
    order = sorted(range(n), key=lambda i: (placed[i][0], placed[i][1]))  # describe them left to right
    words = [f"{_a(shapes[i][1])} {shapes[i][0]}" for i in order]
    caption = f"{n} shape{'s' if n > 1 else ''}: {_join(words)}"
    ops = [_shape_op(k, cx, cy, r, PALETTE[c]) for (cx, cy, r), (k, c) in zip(placed, shapes)]
    return Scene(w, h, bg, str(n), caption, ops)


def sample_bars(rng: random.Random) -> Scene:
    w, h, bg = _canvas(rng)
    n, color = rng.choice(BAR_COUNTS), rng.choice(list(PALETTE))
    margin = 3
    plot = h - 2 * margin
    gap = math.ceil(0.12 * plot)  # the tallest bar beats the next by >= 12 % of the plot height
    top = math.floor(0.94 * plot)
    heights = [rng.randint(math.ceil(0.15 * plot), top - gap) for _ in range(n)]
    tallest = rng.randrange(n)
    heights[tallest] = rng.randint(max(heights[:tallest] + heights[tallest + 1 :]) + gap, top)
    slot = (w - 2 * margin) / n
    bar_w = max(2, int(0.6 * slot))
    ops = []
    for i, bh in enumerate(heights):
        x0 = margin + int(i * slot + (slot - bar_w) / 2)
        ops.append(("rectangle", (x0, h - margin - bh, x0 + bar_w - 1, h - margin - 1), PALETTE[color]))
    # Heights in tenths of the plot: the >= 12 % gap keeps the tallest one strictly largest after rounding.
    tenths = [str(round(10 * bh / plot)) for bh in heights]
    return Scene(w, h, bg, str(tallest + 1), f"{n} {color} bars of heights {_join(tenths)}", ops)


def sample_read(rng: random.Random, cfg: ReadConfig) -> Scene:
    w, h, bg = _canvas(rng, cfg.min_tiles)
    glyph = rng.choice(cfg.glyphs)
    size = rng.randint(round(cfg.font_frac[0] * TILE), round(cfg.font_frac[1] * TILE))
    mask = glyph_mask(glyph, size, cfg.stroke_width)
    mw, mh = mask.size
    if cfg.placement == "tile":
        col, row = rng.randrange(w // TILE), rng.randrange(h // TILE)
        j = round(cfg.jitter_frac * TILE)
        # Centre of the tile plus jitter, clamped so the ink never crosses the tile's border.
        x = col * TILE + min(max((TILE - mw) // 2 + rng.randint(-j, j), 0), max(TILE - mw, 0))
        y = row * TILE + min(max((TILE - mh) // 2 + rng.randint(-j, j), 0), max(TILE - mh, 0))
    else:
        x, y = rng.randint(0, max(w - mw, 0)), rng.randint(0, max(h - mh, 0))
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    kind = "digit" if glyph.isdigit() else "letter" if glyph.isalpha() else "character"
    return Scene(w, h, bg, glyph, f"a large dark {kind} {glyph}", [("glyph", (x, y), mask, ink)])
