"""Tests for nvlm.vision.tiling: parity with an independent transcription of InternVL's dynamic_preprocess."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nvlm.vision.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TilePlan,
    candidate_grids,
    choose_grid,
    plan_tiles,
    preprocess,
    tile_image,
    tiles_to_tensor,
)

# ---------------------------------------------------------------------------------------------------------
# Reference transcription (written from the algorithm's description, deliberately naive: triple loop into a
# set, stable sort by area, then the closest-aspect search with the half-canvas tie rule).


def ref_candidates(min_num: int, max_num: int) -> list[tuple[int, int]]:
    ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return sorted(ratios, key=lambda x: x[0] * x[1])


def ref_grid(width: int, height: int, image_size: int = 448, min_num: int = 1, max_num: int = 6):
    """Returns (grid, number of exact ties met along the way)."""
    aspect_ratio = width / height
    area = width * height
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    ties = 0
    for ratio in ref_candidates(min_num, max_num):
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            ties += 1
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio, ties


def ref_num_tiles(width, height, image_size=448, min_num=1, max_num=6, use_thumbnail=True) -> int:
    (c, r), _ = ref_grid(width, height, image_size, min_num, max_num)
    blocks = c * r
    return blocks + (1 if use_thumbnail and blocks != 1 else 0)


# ---------------------------------------------------------------------------------------------------------
# Parity table: (width, height, tile_size, min_tiles, max_tiles)

# fmt: off
_TIE_SIZES = [
    (1000, 800), (500, 400), (896, 448), (1344, 896), (634, 634), (633, 633), (800, 600), (1024, 768),
    (640, 480), (320, 240), (1600, 1200), (600, 400), (1200, 800), (300, 200), (2400, 1600), (1250, 1000),
    (5, 4), (4, 5), (800, 1000), (400, 500), (3, 2), (2, 3), (4, 3), (3, 4), (1792, 896), (896, 1792),
]
_EDGE_SIZES = [
    (1, 1), (1, 20000), (20000, 1), (448, 448), (449, 448), (448, 449), (100000, 100000), (1, 2), (2, 1),
    (1920, 1080), (1080, 1920), (1280, 720), (2048, 512), (512, 2048), (300, 1200), (8000, 6000),
    (6000, 8000), (3000, 1000), (700, 100), (100, 700), (999, 1), (1, 999), (4096, 4096), (12345, 678),
]
CASES = (
    [(w, h, 448, 1, 6) for w, h in _TIE_SIZES + _EDGE_SIZES]
    + [(w, h, 224, 1, 6) for w, h in _TIE_SIZES[:12] + _EDGE_SIZES[:8]]
    + [(w, h, 448, 1, mx) for mx in (1, 4, 12) for w, h in _TIE_SIZES[:10] + _EDGE_SIZES[:7]]
    + [(w, h, 448, 2, mx) for mx in (4, 6, 12) for w, h in _TIE_SIZES[:8] + _EDGE_SIZES[:7]]
    # Image area exactly equal to half a tied grid's canvas (only reachable with small tile sizes).
    + [(9, 8, 6, 1, 6), (8, 9, 6, 1, 4), (32, 25, 20, 1, 4), (54, 48, 36, 1, 6), (10, 8, 6, 1, 6)]
)
# fmt: on


def test_parity_table_is_large_and_exercises_ties():
    assert len(CASES) >= 60
    # The table must actually hit the exact-float tie branch, both ways (taken and not taken).
    tie_cases = [c for c in CASES if ref_grid(c[0], c[1], c[2], c[3], c[4])[1] > 0]
    assert len(tie_cases) >= 20
    assert ref_grid(1000, 800)[1] >= 2 and ref_grid(500, 400)[1] >= 2


@pytest.mark.parametrize("w,h,ts,mn,mx", CASES)
def test_choose_grid_and_plan_match_reference(w, h, ts, mn, mx):
    expected, _ = ref_grid(w, h, ts, mn, mx)
    assert choose_grid(w, h, ts, mn, mx) == expected
    plan = plan_tiles(w, h, ts, mn, mx)
    assert plan.grid == expected
    assert plan.num_tiles == ref_num_tiles(w, h, ts, mn, mx)
    assert mn <= plan.num_regular <= mx
    assert plan.thumbnail == (plan.num_regular > 1)
    assert plan_tiles(w, h, ts, mn, mx, use_thumbnail=False).num_tiles == plan.num_regular


def test_tie_threshold_is_strict():
    # 9x8 ties (1,1) with (2,2); its area 72 equals 0.5 * 6 * 6 * 4 exactly, so (2,2) is NOT taken.
    assert choose_grid(9, 8, tile_size=6) == (1, 1)
    assert choose_grid(10, 8, tile_size=6) == (2, 2)  # 80 > 72: taken; 80 < 108, so (3,2) is not
    assert choose_grid(9, 9, tile_size=6) == (2, 2)


# fmt: off
@pytest.mark.parametrize(
    "w,h,grid,n",
    [
        (1000, 800, (3, 2), 7), (1920, 1080, (2, 1), 3), (1280, 720, (2, 1), 3), (1080, 1920, (1, 2), 3),
        (500, 400, (1, 1), 1), (2048, 512, (4, 1), 5), (448, 448, (1, 1), 1), (600, 600, (1, 1), 1),
        (633, 633, (1, 1), 1), (634, 634, (2, 2), 5), (1000, 1000, (2, 2), 5), (5000, 5000, (2, 2), 5),
        (800, 600, (3, 2), 7), (1024, 768, (3, 2), 7), (300, 1200, (1, 4), 5),
    ],
)
# fmt: on
def test_worked_examples(w, h, grid, n):
    plan = plan_tiles(w, h)
    assert plan.grid == grid
    assert plan.num_tiles == n
    assert plan.thumbnail == (n > 1)


def test_candidate_grids_order():
    # fmt: off
    assert candidate_grids() == [
        (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2),
        (1, 5), (5, 1), (6, 1), (2, 3), (1, 6), (3, 2),
    ]
    # fmt: on
    for mn in range(1, 8):
        for mx in range(mn, 41):
            assert candidate_grids(mn, mx) == ref_candidates(mn, mx), (mn, mx)


def test_brute_force_sweep():
    mismatches = []
    for mx in (6, 12):
        for w in range(1, 2000, 37):
            for h in range(1, 2000, 37):
                if choose_grid(w, h, 448, 1, mx) != ref_grid(w, h, 448, 1, mx)[0]:
                    mismatches.append((w, h, mx))
    assert mismatches == []


@pytest.mark.parametrize("w,h", [(1, 1), (1, 20000), (20000, 1), (10**9, 1), (1, 10**9), (100000, 100000)])
@pytest.mark.parametrize("mn,mx", [(1, 1), (1, 6), (2, 12), (5, 5)])
def test_grid_always_within_bounds(w, h, mn, mx):
    cols, rows = choose_grid(w, h, 448, mn, mx)
    assert mn <= cols * rows <= mx


@pytest.mark.parametrize(
    "kwargs,argname",
    [
        ({"width": 0, "height": 5}, "width"),
        ({"width": 5, "height": 0}, "height"),
        ({"width": 5, "height": 5, "tile_size": 0}, "tile_size"),
        ({"width": 5, "height": 5, "min_tiles": 0}, "min_tiles"),
        ({"width": 5, "height": 5, "min_tiles": 4, "max_tiles": 3}, "max_tiles"),
    ],
)
def test_argument_validation(kwargs, argname):
    with pytest.raises(ValueError, match=argname):
        plan_tiles(**kwargs)


def test_numpy_ints_accepted_floats_rejected():
    plan = plan_tiles(np.int64(1000), np.int32(800), tile_size=np.int64(448))
    assert plan.grid == (3, 2) and type(plan.width) is int and type(plan.tile_size) is int
    with pytest.raises(ValueError, match="width"):
        plan_tiles(1000.0, 800)
    with pytest.raises(ValueError, match="max_tiles"):
        candidate_grids(1, 0)


def test_boxes_row_major_and_cover_canvas():
    plan = plan_tiles(1000, 800)
    # fmt: off
    assert plan.boxes == [
        (0, 0, 448, 448), (448, 0, 896, 448), (896, 0, 1344, 448),
        (0, 448, 448, 896), (448, 448, 896, 896), (896, 448, 1344, 896),
    ]
    # fmt: on
    plan = TilePlan(width=10, height=10, tile_size=7, grid=(4, 3), thumbnail=True)
    cover = np.zeros((3 * 7, 4 * 7), dtype=int)
    for left, top, right, bottom in plan.boxes:
        cover[top:bottom, left:right] += 1
    assert (cover == 1).all()  # every canvas pixel covered exactly once
    assert plan.num_regular == 12 and plan.num_tiles == 13


def test_to_dict():
    # fmt: off
    assert plan_tiles(1920, 1080).to_dict() == {
        "width": 1920, "height": 1080, "tile_size": 448, "grid": [2, 1], "num_tiles": 3,
        "thumbnail": True, "boxes": [[0, 0, 448, 448], [448, 0, 896, 448]],
    }
    # fmt: on
    assert plan_tiles(500, 400).to_dict()["thumbnail"] is False


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_tile_image_count_sizes_and_thumbnail_last():
    img = _noise(1000, 800)
    plan = plan_tiles(*img.size)
    tiles = tile_image(img, plan)
    assert len(tiles) == plan.num_tiles == 7
    assert all(t.size == (448, 448) and t.mode == "RGB" for t in tiles)
    thumb = np.asarray(img.resize((448, 448), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(tiles[-1]), thumb)
    canvas = np.asarray(img.resize((1344, 896), Image.Resampling.BICUBIC))
    for k, t in enumerate(tiles[:-1]):
        r, c = divmod(k, 3)
        assert np.array_equal(np.asarray(t), canvas[r * 448 : (r + 1) * 448, c * 448 : (c + 1) * 448])


@pytest.mark.parametrize("w,h,grid", [(896, 448, (2, 1)), (1344, 896, (3, 2)), (448, 1344, (1, 3))])
def test_tiles_are_exact_crops_when_canvas_equals_image(w, h, grid):
    # The image already has the canvas size, so tile k must be the raw pixels of the original at its box.
    img = _noise(w, h, seed=w + h)
    plan = plan_tiles(w, h)
    assert plan.grid == grid
    src = np.asarray(img)
    tiles = tile_image(img, plan)
    for k in range(plan.num_regular):
        r, c = divmod(k, grid[0])
        assert np.array_equal(np.asarray(tiles[k]), src[r * 448 : (r + 1) * 448, c * 448 : (c + 1) * 448])


def test_single_tile_has_no_thumbnail_and_non_rgb_is_converted():
    img = Image.new("L", (500, 400), 77)
    tiles = tile_image(img, plan_tiles(500, 400))
    assert len(tiles) == 1 and tiles[0].mode == "RGB"
    assert np.asarray(tiles[0])[10, 10].tolist() == [77, 77, 77]


def test_tile_image_rejects_mismatched_plan():
    with pytest.raises(ValueError, match="does not match"):
        tile_image(Image.new("RGB", (10, 10)), plan_tiles(20, 10))


def test_tiles_to_tensor_numerics():
    white = Image.new("RGB", (448, 448), (255, 255, 255))
    mixed = Image.new("RGB", (448, 448), (0, 51, 255))
    x = tiles_to_tensor([white, mixed])
    assert x.shape == (2, 3, 448, 448) and x.dtype == torch.float32 and x.is_contiguous()
    for ch in range(3):
        want_white = (1.0 - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch]
        assert torch.allclose(x[0, ch], torch.full((448, 448), want_white), atol=1e-6)
    want = [(0.0 - 0.485) / 0.229, (0.2 - 0.456) / 0.224, (1.0 - 0.406) / 0.225]
    assert torch.allclose(x[1, :, 5, 7], torch.tensor(want), atol=1e-6)
    # Custom constants are honoured.
    y = tiles_to_tensor([white], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert torch.allclose(y, torch.ones_like(y))
    with pytest.raises(ValueError):
        tiles_to_tensor([])


@pytest.mark.parametrize("w,h", [(1, 1), (1, 20000), (20000, 1), (448, 448), (449, 448), (3000, 2000)])
def test_preprocess_extreme_shapes(w, h):
    img = Image.new("RGB", (w, h), (10, 200, 30))
    x, plan = preprocess(img)
    assert plan.num_regular <= 6
    assert x.shape == (plan.num_tiles, 3, 448, 448)
    assert torch.isfinite(x).all()
    assert plan.grid == ref_grid(w, h)[0]
    want_g = (200 / 255 - IMAGENET_MEAN[1]) / IMAGENET_STD[1]
    assert abs(float(x[0, 1, 0, 0]) - want_g) < 1e-5  # a solid colour survives bicubic resizing exactly


def test_preprocess_small_tile_size():
    x, plan = preprocess(_noise(300, 200), tile_size=224, max_tiles=4)
    assert plan.grid == ref_grid(300, 200, 224, 1, 4)[0]
    assert x.shape == (plan.num_tiles, 3, 224, 224)
