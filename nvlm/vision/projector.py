"""Projectors: the modality-alignment modules that map pixel-shuffled tile tokens to the LLM's width (§4.5).

NVLM-D and NVLM-H use a 2-layer MLP, LayerNorm(4C) → Linear(no bias) → GELU → Linear(no bias), whose hidden
width is the LLM's FFN size in the released 72B model (12800 → 29568 → 8192). NVLM-X uses one Linear
(12800 → 8192). Parameter names follow transformers' InternVL projector so checkpoints map one-to-one.
"""

from __future__ import annotations

import torch
from torch import nn


class MLPProjector(nn.Module):
    """LayerNorm → Linear → GELU → Linear, no linear biases (NVLM-D / NVLM-H)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(in_dim, eps=eps)
        self.linear_1 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.act = nn.GELU()  # exact (erf) GELU, as Megatron and the HF release
        self.linear_2 = nn.Linear(hidden_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_dim] → [..., out_dim]
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class LinearProjector(nn.Module):
    """One Linear layer (NVLM-X)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def build_projector(
    arch: str, in_dim: int, out_dim: int, hidden_dim: int, eps: float = 1e-5
) -> MLPProjector | LinearProjector:
    if arch == "X":
        return LinearProjector(in_dim, out_dim)
    return MLPProjector(in_dim, hidden_dim, out_dim, eps)
