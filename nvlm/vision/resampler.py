"""Perceiver resampler (paper Appendix C; Flamingo §2.1, after Jaegle et al.'s Perceiver): an option, off by default.

NVLM does not use one: Appendix C finds that Flamingo's resampler, which mixes every image token into a few
learned latents, keeps a model from fitting dense OCR, and so NVLM-X reads the tile tokens directly. This module
exists to re-run that comparison (``config.resampler.latents > 0``).

Where it sits: per tile, after the vision encoder, pixel shuffle and projector, in the LLM's width. In Flamingo
the resampler sits between the vision encoder and the gated cross-attention layers, which then read only its
latents; Appendix C's ablation removes it and trains the cross-attention layers on the image tokens directly.
Putting it right after the projector reproduces exactly that contrast: with and without it, everything else
(encoder, pixel shuffle, projector, x-attn blocks) is the same, and the projector keeps the released shapes.
Each tile's ``tokens_per_tile`` (256 for InternViT at 448 px) tokens become ``latents`` tokens, wherever the
tile's tokens go: the decoder's image-pad slots (D, H's thumbnail) or the x-attn memory (X, H).

One layer, as in Flamingo: the latents cross-attend to [tile tokens ; latents] (keys and values from both), then
an MLP, each pre-normed and residual; a final LayerNorm.
"""

from __future__ import annotations

import torch
from torch import nn


class ResamplerLayer(nn.Module):
    """latents ← latents + Attn(LN(latents), LN([x ; latents])); latents ← latents + MLP(LN(latents))."""

    def __init__(self, dim: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ffn_mult * dim, bias=False),
            nn.GELU(),
            nn.Linear(ffn_mult * dim, dim, bias=False),
        )

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x [N, T, d] tile tokens, latents [N, L, d] → [N, L, d]."""
        n, length, d = latents.shape
        h = self.heads
        lat = self.norm_latents(latents)
        kv_in = torch.cat([self.norm_media(x), lat], dim=1)  # [N, T + L, d]
        q = self.q_proj(lat).reshape(n, length, h, d // h).transpose(1, 2)  # [N, h, L, d/h]
        k, v = self.kv_proj(kv_in).chunk(2, dim=-1)  # [N, T + L, d] each
        k = k.reshape(n, -1, h, d // h).transpose(1, 2)  # [N, h, T + L, d/h]
        v = v.reshape(n, -1, h, d // h).transpose(1, 2)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # [N, h, L, d/h]
        latents = latents + self.o_proj(attn.transpose(1, 2).reshape(n, length, d))
        return latents + self.mlp(latents)


class PerceiverResampler(nn.Module):
    """[N, T, d] tokens of N tiles → [N, latents, d]: the same learned latents for every tile."""

    def __init__(self, dim: int, latents: int, layers: int, heads: int, ffn_mult: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"resampler.heads={heads} must divide the LLM width {dim}")
        self.latents = nn.Parameter(torch.randn(latents, dim) * dim**-0.5)  # [L, d]
        self.layers = nn.ModuleList(ResamplerLayer(dim, heads, ffn_mult) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, d] → [N, L, d]
        lat = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)  # [N, L, d]
        for layer in self.layers:
            lat = layer(x, lat)
        return self.norm(lat)
