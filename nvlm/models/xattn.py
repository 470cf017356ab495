"""Gated cross-attention (paper §4.3–4.4): the block NVLM-X and NVLM-H insert among LLM layers.

    h   = x + tanh(g_attn) · row_mask · XAttn(RMSNorm(x), memory)
    out = h + tanh(g_ffn)  · row_mask · FFN(RMSNorm(h))

Both gates are scalars initialised to 0, so an untrained block is an exact identity and the LLM's text
behaviour is untouched. Queries come from the text stream, keys/values from the image memory (projected tile
tokens; for NVLM-H also the tile tags' text embeddings). q and k get a per-head RMSNorm; there is no RoPE.
Which memory tokens a text token may see is a range [lo, hi) per token (see ``xattn_mask``): a tile tag sees
only its own tile, other tokens see the images that came before them, and a token that sees nothing has its
row zeroed (``row_mask``) instead of producing NaN from an empty softmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nvlm.models.llm import LLMDims


def xattn_mask(lo: torch.Tensor, hi: torch.Tensor, memory_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ranges → (allowed [B, T, M] bool, row_mask [B, T, 1] float: 1 where the row sees anything)."""
    m = torch.arange(memory_len, device=lo.device)  # [M]
    allowed = (m >= lo[..., None]) & (m < hi[..., None])  # [B, T, M]
    row = allowed.any(-1, keepdim=True)  # [B, T, 1]
    # Rows that see nothing attend everywhere (finite softmax) and are then multiplied by 0.
    allowed = allowed | ~row
    return allowed, row.float()


@dataclass
class XAttnState:
    """The image memory of a batch and each block's K/V of it, computed once per image and reused while decoding."""

    memory: torch.Tensor  # [B, M, d]
    memory_len: torch.Tensor  # [B] valid memory tokens per sample
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # block → ([B,kvH,M,hd], …)
    # a decoding step's (allowed, row_mask): the same at every step, so made once per state (``step_mask``)
    _step: tuple[torch.Tensor | None, torch.Tensor | None] | None = field(default=None, repr=False)

    def step_mask(self, b: int, t: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(allowed, row_mask) for `t` new tokens per sample that each see their sample's whole memory (a
        decoding step); (None, None) when every sample's memory is all valid: then the blocks attend without a
        mask and skip the row multiply, bitwise the same. Made once (one device→host read of memory_len), so
        a state must not have memory_len changed in place afterwards (``nvlm.serve.batch`` builds new ones)."""
        if self._step is None or (self._step[0] is not None and self._step[0].shape[:2] != (b, t)):
            if bool((self.memory_len == self.memory.shape[1]).all()):
                self._step = (None, None)
            else:
                lo = torch.zeros(b, t, dtype=torch.long, device=self.memory.device)
                self._step = xattn_mask(lo, self.memory_len[:, None].expand(b, t), self.memory.shape[1])
        return self._step


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """SDPA of q [B, H, T, hd] over K/V [B, kvH, M, hd] (grouped-query when kvH < H), `allowed` [B, T, M] or None.

    Without a mask SDPA shares each K/V head among its query heads itself (``enable_gqa``): the cached K/V are
    not copied on every decoding step, and CUDA runs the flash kernel. With a mask, ``enable_gqa`` would leave
    CUDA only the math kernel (flash takes no mask, the memory-efficient kernel no GQA), which materialises
    fp32 [B, H, T, M] scores and keeps them for backward; so K/V are repeated to every query head instead (as
    transformers does for masked GQA) and the memory-efficient kernel runs. Both give the same result."""
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, M, hd]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None].to(q.device))  # mask [B, 1, T, M]


class GatedCrossAttentionBlock(nn.Module):
    """One gated cross-attention block with its own norms, attention, FFN (SwiGLU) and two tanh gates."""

    def __init__(self, dims: LLMDims, ffn_size: int | None = None) -> None:
        super().__init__()
        d, hd = dims.hidden_size, dims.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = dims.num_heads, dims.num_kv_heads, hd
        ffn = ffn_size or dims.ffn_size
        eps = dims.rms_norm_eps
        self.input_norm = nn.RMSNorm(d, eps=eps)
        self.q_proj = nn.Linear(d, dims.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, dims.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, dims.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(dims.num_heads * hd, d, bias=False)
        self.q_norm = nn.RMSNorm(hd, eps=eps)
        self.k_norm = nn.RMSNorm(hd, eps=eps)
        self.post_norm = nn.RMSNorm(d, eps=eps)
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ffn = nn.Parameter(torch.zeros(1))

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, M, d] → K, V of shape [B, kvH, M, hd]; done once per image memory."""
        b, m, _ = memory.shape
        # -1 heads: under tensor parallelism a rank's k/v projections yield its own kvH/tp heads only
        k = self.k_norm(self.k_proj(memory).view(b, m, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(memory).view(b, m, -1, self.head_dim).transpose(1, 2)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        allowed: torch.Tensor | None,
        row_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B, T, d]; memory [B, M, d] or its cached (K, V) from an earlier call; allowed [B, T, M] bool;
        row_mask [B, T, 1] (both None: every row sees the whole memory). Returns the new hidden states and
        (K, V), which decoding reuses.

        K/V are computed inside ``forward`` (not by the caller) so that a sharded block (FSDP) gathers its
        weights once per call."""
        b, t, _ = x.shape
        dtype, out_dtype = self.q_proj.weight.dtype, x.dtype  # a bf16 LLM may host fp32 blocks (or the reverse)
        x = x.to(dtype)
        kv = self.memory_kv(memory.to(dtype)) if isinstance(memory, torch.Tensor) else memory
        k, v = kv
        q = self.q_norm(self.q_proj(self.input_norm(x)).view(b, t, -1, self.head_dim)).transpose(1, 2)  # [B,H,T,hd]
        a = attend(q, k, v, allowed)  # [B, H, T, hd]
        a = self.o_proj(a.transpose(1, 2).reshape(b, t, -1))  # [B, T, d]
        if row_mask is not None:
            a = a * row_mask.to(a.dtype)
        h = x + torch.tanh(self.gate_attn).to(x.dtype) * a
        n = self.post_norm(h)
        f = self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n))
        if row_mask is not None:
            f = f * row_mask.to(f.dtype)
        return (h + torch.tanh(self.gate_ffn).to(h.dtype) * f).to(out_dtype), kv


@dataclass
class XAttnInputs:
    """What every gated block of one forward reads, passed down to the decoder layers as an argument."""

    state: XAttnState  # the image memory and, while decoding, each block's cached K/V
    allowed: torch.Tensor | None  # [B, T, M] bool: which memory tokens each text token may see (None: all)
    row_mask: torch.Tensor | None  # [B, T, 1]: 0 for rows that see no memory token (None: every row sees some)


class CrossAttentionDecoderLayer(nn.Module):
    """A scheduled LLM decoder layer with its gated cross-attention block run first (paper §4.3):

        hidden = block(hidden, image memory, allowed, row_mask)   # skipped when the batch has no memory
        return layer(hidden, ...)                                  # the backbone's own layer, untouched

    It takes the layer's place in the LLM's layer list; the LLM calls it like its other layers and passes
    NVLM's ``xattn=XAttnInputs`` keyword down (transformers hands extra keyword arguments to every decoder
    layer). With ``checkpointing`` on, block and layer are recomputed together in backward, so neither keeps
    its activations. The block is owned by ``NVLM.xattn`` (saved as ``xattn.{i}.*``, trained in both stages,
    an FSDP unit of its own): this module only calls it, and registers only the layer (as ``layer``).
    """

    def __init__(self, layer: nn.Module, block: GatedCrossAttentionBlock, block_idx: int) -> None:
        super().__init__()
        self.layer: Any = layer  # the backbone's own decoder layer (an HF GradientCheckpointingLayer)
        self.block_idx = block_idx
        self._block = (block,)  # a tuple: not registered here (NVLM.xattn owns it)
        self.checkpointing = False

    @property
    def block(self) -> GatedCrossAttentionBlock:
        return self._block[0]

    def forward(self, hidden_states: torch.Tensor, *args: Any, xattn: XAttnInputs | None = None, **kwargs: Any) -> Any:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._block_then_layer, hidden_states, *args, xattn=xattn, use_reentrant=False, **kwargs)
        return self._block_then_layer(hidden_states, *args, xattn=xattn, **kwargs)

    def _block_then_layer(
        self, hidden_states: torch.Tensor, *args: Any, xattn: XAttnInputs | None = None, **kwargs: Any
    ) -> Any:
        if xattn is not None:  # None: a text-only batch, or the gates switched off
            state = xattn.state
            # K/V of the image memory: computed by the prefill's call, reused by every decoding step
            hidden_states, kv = self.block(
                hidden_states, state.kv.get(self.block_idx, state.memory), xattn.allowed, xattn.row_mask
            )
            if kwargs.get("use_cache"):  # only a decoding cache keeps them (training would hold them all)
                state.kv[self.block_idx] = kv
        return self.layer(hidden_states, *args, **kwargs)


def schedule(num_layers: int, every: int | None, layers: list[int] | None) -> list[int]:
    """LLM layer indices that get a block before them. Default: every ≈ L/10, i.e. 10 blocks (paper §4.5)."""
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"xattn.layers {bad} out of range for an LLM with {num_layers} layers")
        return sorted(set(layers))
    k = every or max(1, round(num_layers / 10))
    return list(range(0, num_layers, k))
