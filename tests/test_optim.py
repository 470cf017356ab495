"""The AdamW the trainer builds: fused on CPU (torch ≥ 2.4 has CPU kernels), the same updates as torch's loop."""

from __future__ import annotations

import torch
from torch import nn

from nvlm.training.optim import make_optimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def test_fused_adamw_on_cpu_matches_the_per_tensor_loop():
    a, b = _model(), _model()
    opt_a = make_optimizer(a, 1e-2, 0.1, (0.9, 0.95))
    assert all(g["fused"] for g in opt_a.param_groups)
    opt_b = torch.optim.AdamW(  # torch's CPU default: the single-tensor loop
        [
            {"params": [p for p in b.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in b.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
        foreach=False,
    )
    x = torch.randn(5, 8)
    for _ in range(5):
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_meta_parameters_fall_back_to_foreach():
    with torch.device("meta"):
        m = nn.Linear(4, 4)
    opt = make_optimizer(m, 1e-3, 0.0, (0.9, 0.95))
    assert all(g["foreach"] and not g["fused"] for g in opt.param_groups)
