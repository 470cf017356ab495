"""A new model's x-attn blocks are drawn a few rows at a time from their own seed: any block of a tensor equals
the same box of the whole tensor, drawing it touches only the row chunks it overlaps, the values follow torch's
own init, and building twice from one seed gives the same model. (Two processes holding the one-process values:
tests/test_sharded_load.py.)

python -m pytest tests/test_xattn_init.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from nvlm.models import xattn_init
from nvlm.models.xattn_init import CHUNK_ROWS, Drawn


def test_a_block_equals_the_same_box_of_the_whole_tensor():
    t = Drawn(seed=11, key="xattn.0.q_proj.weight", kind="uniform", scale=0.125, shape=(37, 10))
    whole = t.block((37, 10), (0, 0))
    assert whole.shape == (37, 10)
    for shape, offset in [
        ((19, 10), (0, 0)),
        ((18, 10), (19, 0)),
        ((8, 10), (8, 0)),
        ((37, 5), (0, 5)),
        ((3, 4), (30, 2)),
    ]:
        box = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
        assert torch.equal(t.block(shape, offset), whole[box]), (shape, offset)


def test_a_block_draws_only_the_chunks_it_overlaps(monkeypatch):
    drawn: list[int] = []
    real = xattn_init.draw_rows
    monkeypatch.setattr(xattn_init, "draw_rows", lambda t, chunk, rows: drawn.append(rows) or real(t, chunk, rows))
    t = Drawn(seed=3, key="k", kind="uniform", scale=1.0, shape=(64, 16))
    t.block((32, 16), (32, 0))  # the second of two processes' halves
    assert sum(drawn) == 32 and len(drawn) == 32 // CHUNK_ROWS


def test_values_follow_torch_init_and_differ_per_tensor_and_seed():
    w = Drawn(5, "xattn.0.up_proj.weight", "uniform", 1 / math.sqrt(256), (512, 256)).block((512, 256), (0, 0))
    bound = 1 / math.sqrt(256)
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.01 * bound  # the std of U(-b, b)
    other_key = Drawn(5, "xattn.0.gate_proj.weight", "uniform", bound, (512, 256)).block((512, 256), (0, 0))
    other_seed = Drawn(6, "xattn.0.up_proj.weight", "uniform", bound, (512, 256)).block((512, 256), (0, 0))
    assert not torch.equal(w, other_key) and not torch.equal(w, other_seed)
    assert torch.equal(Drawn(5, "g", "constant", 0.0, (1,)).block((1,), (0,)), torch.zeros(1))


@pytest.mark.parametrize("arch", ["X", "H"])
def test_a_new_model_draws_its_blocks_from_the_seed(build_model, arch):
    a, _ = build_model(arch, seed=4)
    b, _ = build_model(arch, seed=4)
    c, _ = build_model(arch, seed=5)
    block = a.xattn[0]
    assert torch.equal(block.q_proj.weight, b.xattn[0].q_proj.weight)
    assert not torch.equal(block.q_proj.weight, c.xattn[0].q_proj.weight)
    assert torch.equal(block.gate_attn, torch.zeros(1)) and torch.equal(
        block.input_norm.weight, torch.ones_like(block.input_norm.weight)
    )
    bound = 1 / math.sqrt(block.down_proj.in_features)
    assert 0.9 * bound < block.down_proj.weight.abs().max() <= bound
    assert not any(p.is_meta for p in a.parameters())


def test_an_x_attn_tensor_without_a_rule_is_an_error():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.xattn = torch.nn.ModuleList([Odd()])

    with pytest.raises(TypeError, match="xattn.0.scale"):
        xattn_init.plan(Model(), seed=1)
