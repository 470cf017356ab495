"""Pixel shuffle v2: token (i, j) at index 16·i + j holds patches (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1).

python -m pytest tests/test_pixel_shuffle.py -q
"""

import pytest
import torch

from nvlm.vision.pixel_shuffle import pixel_shuffle


def test_token_holds_the_right_four_patches():
    g, c = 32, 3
    # patch (r, col) carries the values (r, col, channel) so we can read back where each came from
    r, col, ch = torch.meshgrid(torch.arange(g), torch.arange(g), torch.arange(c), indexing="ij")
    patches = (r * 10000 + col * 100 + ch).reshape(1, g * g, c).float().repeat(2, 1, 1)
    out = pixel_shuffle(patches)
    assert out.shape == (2, 256, 4 * c)
    for i, j in [(0, 0), (0, 1), (1, 0), (5, 11), (15, 15), (7, 0)]:
        token = out[1, 16 * i + j].reshape(4, c)
        for slot, (dr, dc) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            expected = torch.tensor([(2 * i + dr) * 10000 + (2 * j + dc) * 100 + k for k in range(c)]).float()
            assert torch.equal(token[slot], expected), (i, j, slot)


def test_not_the_transposed_v1():
    patches = torch.arange(16).reshape(1, 16, 1).float()  # 4×4 grid
    out = pixel_shuffle(patches)  # 2×2 tokens
    assert out[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]  # token (0, 1): right of token (0, 0), not below it


def test_bad_grids_and_ratio():
    with pytest.raises(ValueError, match="even square"):
        pixel_shuffle(torch.zeros(1, 27 * 27, 4))
    with pytest.raises(ValueError, match="ratio"):
        pixel_shuffle(torch.zeros(1, 16, 4), 0.25)
    x = torch.randn(1, 9, 4)
    assert pixel_shuffle(x, 1.0) is x
