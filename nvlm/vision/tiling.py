"""Dynamic high-resolution tiling (NVLM 1.0 paper §4.1), as pure functions.

An image is cut into a grid of ``tile_size`` x ``tile_size`` tiles whose (cols, rows) shape best matches
the image's aspect ratio, with 1 to 6 tiles by default; a downscaled thumbnail of the whole image is
appended last when there is more than one tile. The grid choice reproduces InternVL's
``dynamic_preprocess`` / ``find_closest_aspect_ratio`` bit for bit (used unchanged by NVLM-D, Megatron-LM
and vLLM), including its tie-breaking and the CPython set iteration order of the candidate grids, because
the released checkpoints were trained on exactly those layouts.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the grid arithmetic and MAX_TILES_LIMIT (which the configs and the
    import torch  # CLI's argument parser read) load without torch, numpy or Pillow
    from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_TILES_LIMIT",
    "TilePlan",
    "check_tile_counts",
    "candidate_grids",
    "choose_grid",
    "plan_tiles",
    "tile_image",
    "tiles_to_tensor",
    "preprocess",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Ceiling on max_tiles, sized for the model: 40 tiles is InternVL-1.5's largest test-time setting (up to 4K
# images); at 256 tokens a tile that is 10,240 tokens for one image, a third of Qwen2's 32K context. Beyond it
# the sequence does not fit and the grid search (quadratic in max_tiles) only burns time. TilingConfig and
# ``nvlm inspect --max-tiles`` take their ceiling from here.
MAX_TILES_LIMIT = 40


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image come from. ``grid`` is (cols, rows)."""

    width: int
    height: int
    tile_size: int
    grid: tuple[int, int]
    thumbnail: bool

    @property
    def num_regular(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tiles(self) -> int:
        return self.num_regular + (1 if self.thumbnail else 0)

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of each regular tile in the resized canvas, row-major."""
        cols, rows = self.grid
        s = self.tile_size
        return [(c * s, r * s, (c + 1) * s, (r + 1) * s) for r in range(rows) for c in range(cols)]

    def to_dict(self) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "tile_size": self.tile_size,
            "grid": [self.grid[0], self.grid[1]],
            "num_tiles": self.num_tiles,
            "thumbnail": self.thumbnail,
            "boxes": [list(b) for b in self.boxes],
        }


def _int_arg(name: str, value: int, minimum: int) -> int:
    # operator.index accepts numpy/torch integer scalars (e.g. sizes read off arrays) but not floats.
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return v


def check_tile_counts(min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """``(min_tiles, max_tiles)`` as ints, or ValueError unless ``1 <= min_tiles <= max_tiles <= MAX_TILES_LIMIT``."""
    min_tiles = _int_arg("min_tiles", min_tiles, 1)
    max_tiles = _int_arg("max_tiles", max_tiles, min_tiles)
    if max_tiles > MAX_TILES_LIMIT:
        raise ValueError(
            f"max_tiles must be at most {MAX_TILES_LIMIT} (each tile costs hundreds of tokens and "
            f"the grid search grows with its square), got {max_tiles}; the paper uses 6"
        )
    return min_tiles, max_tiles


def _check_tiles(tile_size: int, min_tiles: int, max_tiles: int) -> tuple[int, int, int]:
    tile_size = _int_arg("tile_size", tile_size, 1)
    return (tile_size, *check_tile_counts(min_tiles, max_tiles))


@functools.lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    # The reference adds (i, j) for every n in [min, max] and every i, j in [1, n]; re-adding an element
    # already in a set changes nothing, so only the order of *first* insertions shapes the set (and hence
    # its iteration order, which decides ties after the stable sort). We insert in that same first-seen
    # order -- all pairs with i, j <= min first, then for each n the pairs with max(i, j) == n, i then j
    # ascending -- which gives an identical set in O(max^2) instead of O(max^3).
    grids: set[tuple[int, int]] = set()
    for n in range(min_tiles, max_tiles + 1):
        if n == min_tiles:
            fresh = [(i, j) for i in range(1, n + 1) for j in range(1, n + 1)]
        else:
            fresh = [(i, n) for i in range(1, n)] + [(n, j) for j in range(1, n + 1)]
        grids.update(g for g in fresh if min_tiles <= g[0] * g[1] <= max_tiles)
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def candidate_grids(min_tiles: int = 1, max_tiles: int = 6) -> list[tuple[int, int]]:
    """All (cols, rows) with ``min_tiles <= cols*rows <= max_tiles``, in the reference's order."""
    _, min_tiles, max_tiles = _check_tiles(1, min_tiles, max_tiles)
    return list(_candidate_grids(min_tiles, max_tiles))


def choose_grid(
    width: int, height: int, tile_size: int = 448, min_tiles: int = 1, max_tiles: int = 6
) -> tuple[int, int]:
    """The (cols, rows) grid InternVL's ``find_closest_aspect_ratio`` picks for a ``width`` x ``height`` image."""
    width, height = _int_arg("width", width, 1), _int_arg("height", height, 1)
    tile_size, min_tiles, max_tiles = _check_tiles(tile_size, min_tiles, max_tiles)
    aspect = width / height
    area = width * height
    best_diff = math.inf
    best = (1, 1)
    for cols, rows in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        # Exact float ties (a 5:4 image is equally far from 1:1, 2:2 and 3:2) go to the later, larger grid
        # only if the image covers more than half of that grid's canvas. Operand order as in the reference.
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def plan_tiles(
    width: int,
    height: int,
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 6,
    use_thumbnail: bool = True,
) -> TilePlan:
    width, height = _int_arg("width", width, 1), _int_arg("height", height, 1)
    tile_size = _int_arg("tile_size", tile_size, 1)
    grid = choose_grid(width, height, tile_size, min_tiles, max_tiles)
    # A lone tile already is the whole image: the reference adds no thumbnail then.
    thumb = bool(use_thumbnail) and grid[0] * grid[1] > 1
    return TilePlan(width=width, height=height, tile_size=tile_size, grid=grid, thumbnail=thumb)


def tile_image(image: Image.Image, plan: TilePlan) -> list[Image.Image]:
    """Cut ``image`` per ``plan``: regular tiles row-major, then the thumbnail (if any) last."""
    from PIL import Image

    if image.size != (plan.width, plan.height):
        raise ValueError(f"image size {image.size} does not match the plan's ({plan.width}, {plan.height})")
    if image.mode != "RGB":
        # The reference converts to RGB before resizing; for "P"/"1" Pillow would otherwise pick NEAREST.
        image = image.convert("RGB")
    cols, rows = plan.grid
    s = plan.tile_size
    canvas = image.resize((s * cols, s * rows), Image.Resampling.BICUBIC)
    tiles = [canvas.crop(box) for box in plan.boxes]
    if plan.thumbnail:
        tiles.append(image.resize((s, s), Image.Resampling.BICUBIC))
    return tiles


def tiles_to_tensor(
    tiles: Sequence[Image.Image],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """[N, 3, S, S] float32: ToTensor (uint8 / 255) then Normalize ((x - mean) / std), per channel."""
    import numpy as np
    import torch

    if len(tiles) == 0:
        raise ValueError("tiles must not be empty")
    if len(mean) != 3 or len(std) != 3 or any(v == 0 for v in std):
        raise ValueError(f"mean and std need 3 values each and std must be non-zero, got {mean!r}, {std!r}")
    size = tiles[0].size
    for k, t in enumerate(tiles):
        if t.mode != "RGB" or t.size != size or size[0] != size[1]:
            raise ValueError(f"tile {k} must be a square RGB image of size {size}, got {t.mode} {t.size}")
    arr = np.stack([np.asarray(t, dtype=np.uint8) for t in tiles])  # [N, S, S, 3]
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    # Same float32 op order as torchvision's ToTensor + Normalize (sub then div).
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub(m).div(sd)


def preprocess(
    image: Image.Image,
    tile_size: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 6,
    use_thumbnail: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[torch.Tensor, TilePlan]:
    """plan_tiles + tile_image + tiles_to_tensor for one (already loaded) PIL image."""
    plan = plan_tiles(image.width, image.height, tile_size, min_tiles, max_tiles, use_thumbnail)
    return tiles_to_tensor(tile_image(image, plan), mean, std), plan
