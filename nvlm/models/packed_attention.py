"""Attention within each packed sample, without the block-diagonal mask (paper §5's packed SFT).

A packed row holds several samples; each token may attend only to earlier tokens of its own sample. Under
SDPA transformers builds that as a dense ``[rows, 1, T, T]`` mask, and the CPU kernel then computes every
masked-out block as well: for a 512-token row of samples of ≈ 100 tokens most of the work is thrown away.
This attention function runs causal SDPA per sample instead (Σ nᵢ² work instead of T²), reading the sample
boundaries from ``cu_seq_lens_q`` — the same keyword transformers' FlashAttention-2 variable-length path reads,
so the model passes one thing to either kernel. Without it (unpacked training, generation) it is
transformers' own SDPA, with the mask transformers builds for SDPA. For packed rows the model hands the layers
their masks ready-made (None: transformers would otherwise build the dense mask this function ignores) and the
boundaries once per forward as host integers (``packed_kwargs``), not read back in every layer.

Registered under ``ATTENTION`` in transformers' attention and mask interfaces by :func:`register`.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

ATTENTION = "nvlm_packed_sdpa"


def segment_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """[rows, T] position ids that restart at 0 per packed sample → cumulative sample lengths over the flattened
    rows ([segments + 1], int32, starting at 0): the ``cu_seq_lens`` of variable-length attention."""
    flat = position_ids.reshape(-1)  # [rows · T]; every row starts a sample (its position 0)
    starts = torch.nonzero(flat == 0).flatten()
    return torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)


def packed_kwargs(position_ids: torch.Tensor) -> dict[str, object]:
    """What a packed forward passes down to every attention call: ``cu_seq_lens_q`` (the tensor
    variable-length kernels read) and ``packed_bounds``, the same boundaries as a list of ints, read once."""
    cu = segment_lengths(position_ids)
    return {"cu_seq_lens_q": cu, "packed_bounds": cu.tolist()}


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, scale: float | None) -> torch.Tensor:
    """One packed sample: [H, n, D] queries over [H_kv, n, D] keys and values, causal (grouped K/V heads)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=True)


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [rows, H, T, D], key/value [rows, H_kv, T, D] → ([rows, T, H, D], None), as transformers expects."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[2] != key.shape[2]:  # not a packed training forward: transformers' SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    rows, heads, t, d = query.shape
    q = query.transpose(0, 1).reshape(heads, rows * t, d)  # [H, rows·T, D]: the rows end to end
    k = key.transpose(0, 1).reshape(key.shape[1], rows * t, d)
    v = value.transpose(0, 1).reshape(value.shape[1], rows * t, d)
    bounds = kwargs.get("packed_bounds") or cu.tolist()  # host ints, read once per forward by the model
    out = per_sample(q, k, v, bounds, dropout if module.training else 0.0, scaling)
    return out.reshape(heads, rows, t, d).permute(1, 2, 0, 3), None  # [rows, T, H, D]


# Left out of torch.compile (train.compile): traced, the loop would be unrolled once per number of packed
# samples and recompiled for each new count until dynamo's recompile limit sends the whole layer back to eager.
@torch.compiler.disable
def per_sample(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], dropout: float, scale: float | None
) -> torch.Tensor:
    """[H, N, D] queries, [H_kv, N, D] keys and values of rows laid end to end → [H, N, D], each packed sample
    (`bounds`: its start and end offsets) attending causally within itself."""
    out = torch.empty_like(q)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out[:, lo:hi] = causal_sdpa(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], dropout, scale)
    return out


def register() -> None:
    """Make ``ATTENTION`` known to transformers (idempotent): the attention function, and SDPA's mask builder
    for the unpacked forwards it hands to SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def use_packed_attention(llm: torch.nn.Module) -> None:
    """Switch the LLM to ``ATTENTION`` (CPU training on packed rows; GPUs have flash_attention_2 / flex_attention)."""
    register()
    llm.set_attn_implementation(ATTENTION)  # type: ignore[operator]
