"""Pixel shuffle "v2" (paper §4.1): 2×2 neighbouring patch tokens → one token of 4× width.

InternViT-6B turns a 448² tile into 32×32 = 1024 patch tokens; NVLM merges each 2×2 block into one token,
giving 16×16 = 256 tokens of width 4·C. Token (i, j) sits at index ``16·i + j`` (row-major) and holds the
channels of patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1), in that order. InternVL's legacy "v1"
transposes every tile (index ``16·j + i``); we never produce it.
"""

from __future__ import annotations

import torch


def pixel_shuffle(tokens: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """[N, g·g, C] patch tokens (row-major g×g grid, no CLS) → [N, (g/2)², 4C]; ratio 1.0 returns the input."""
    if ratio == 1.0:
        return tokens
    if ratio != 0.5:
        raise ValueError(f"pixel_shuffle supports ratio 0.5 (or 1.0 = off), got {ratio}")
    n, length, c = tokens.shape
    g = int(round(length**0.5))
    if g * g != length or g % 2:
        raise ValueError(
            f"pixel shuffle needs an even square patch grid, got {length} tokens; pick a tile size that gives an "
            "even grid (e.g. 448 px with 14 px patches = 32×32) or set vision.downsample=1.0"
        )
    h = g // 2
    x = tokens.reshape(n, h, 2, h, 2, c)  # [N, i, di, j, dj, C]: patch (2i+di, 2j+dj)
    x = x.permute(0, 1, 3, 2, 4, 5)  # [N, i, j, di, dj, C]
    return x.reshape(n, h * h, 4 * c)  # [N, 16·i + j, (di, dj, C)] → order (0,0),(0,1),(1,0),(1,1)
