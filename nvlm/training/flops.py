"""Analytic training FLOPs per sample of NVLM-D / -X / -H (paper Table 3, §4.3–4.4), for the trainer's MFU,
the planner's step-time model and the FLOP-predicted X/D and H/D speed ratios of ``nvlm bench``.

- Matmul FLOPs only, 2 per multiply-add. The input-embedding gather is left out, the LM head is counted.
- A Linear with N weights applied to T tokens costs 2·N·T forward, + 2·N·T for its weight gradient when it
  trains, + 2·N·T for its input gradient when something upstream trains. That gives the usual 6·N per token
  for a trained Linear, 4·N for a frozen one on the gradient path (the LLM during pre-training) and 2·N for a
  frozen one before every trainable part (the vision tower). It also gives 4·N for a trained Linear whose
  input needs no gradient, where the common closed form writes 6·N: NVLM-X's one-Linear projector right
  behind the frozen ViT. That is what autograd runs. (D/H's projector starts with a trainable LayerNorm and
  each x-attn block with a trainable RMSNorm, so their first Linear does need its input gradient: 6·N there.)
- Attention scores and values: 4·T_q·T_k·d_attn forward, 3× that with backward; not halved for causal masks
  and without flash-attention recompute (torchtitan's convention), i.e. 12·L·d·T² for a trained decoder.
- Cross-attention (§4.3's gated x-attn layers): q/o projections and the FFN act on the T_dec text tokens,
  k/v projections on the M memory tokens, attention is 4·d·T_dec·M forward.

Sizes are read off the built model's parameter shapes (every nn.Linear, the patch Conv2d), so any Hugging
Face backbone works; attention widths and depths come from the model's dims and configs. A pooling head that
the vision tower runs but NVLM never reads (SigLIP's attention-pooling probe) is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from nvlm.models.llm import decoder_layers
from nvlm.models.xattn import GatedCrossAttentionBlock
from nvlm.training.stages import STAGES

if TYPE_CHECKING:
    from nvlm.models.nvlm import NVLM

# dense bf16 FLOP/s by GPU name, the lower-clocked PCIe / NVL boards first (NVIDIA's data sheets, dense = half the
# sparse figure: H100 SXM / H200 SXM 989 T, H100 PCIe 756 T, H100 NVL / H200 NVL 835 T, A100 312 T)
PEAK_BF16 = [
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H200", "NVL"), 835e12),
    (("H100",), 989e12),
    (("H200",), 989e12),
    (("A100",), 312e12),
]


def peak_by_name(name: str) -> float | None:
    """Dense bf16 peak of the GPU called `name` (``torch.cuda.get_device_name``); None if not in `PEAK_BF16`."""
    return next((v for parts, v in PEAK_BF16 if all(p in name for p in parts)), None)


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a CUDA `device` (``peak_by_name``); None on CPU (no published per-box peak) and for
    GPUs not in the table."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_by_name(torch.cuda.get_device_name(device))


@dataclass(frozen=True)
class SampleTokens:
    """Token counts of one training sample."""

    decoder: int  # T_dec: decoder sequence length (text, tags and the decoder's image tokens)
    memory: int = 0  # M: cross-attention memory length (0 for NVLM-D)
    tiles: int = 1  # n: tiles through the vision tower (regular tiles + thumbnail)


def trainable_parts(stage: str, *, freeze_llm: bool = False, unfreeze_vision: bool = False) -> dict[str, bool]:
    """Which parts train in `stage`, as ``nvlm.training.stages.apply_stage`` sets them."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    # GRPO and DPO train what SFT trains (``apply_stage``)
    return {"vision": unfreeze_vision, "projector": True, "xattn": True, "llm": stage != "pretrain" and not freeze_llm}


def linear_numel(module: nn.Module) -> int:
    """Weights of every nn.Linear inside `module` (biases are additions, not matmul FLOPs)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def linear_flops(numel: int, tokens: int, trains: bool, grad_in: bool) -> int:
    """Forward + backward FLOPs of Linears with `numel` weights over `tokens` tokens (see the module doc)."""
    return 2 * numel * tokens * (1 + int(trains) + int(grad_in))


def attention_flops(width: int, t_q: int, t_k: int, backward: bool) -> int:
    """Scores (Q·Kᵀ) and values (P·V) of one attention layer: 4·T_q·T_k·width forward, ×3 with backward."""
    return 4 * width * t_q * t_k * (3 if backward else 1)


# Long on purpose: one term per matmul of a training step, each beside its formula.
def train_flops(
    model: NVLM, tokens: SampleTokens, stage: str = "sft", *, freeze_llm: bool = False, unfreeze_vision: bool = False
) -> dict[str, int]:
    """Training FLOPs (forward + backward) of one sample of NVLM `model`, by part and in total.

    Keys: vision, projector, xattn, llm (decoder layers' Linears), llm_attention, lm_head, total.
    """
    parts = trainable_parts(stage, freeze_llm=freeze_llm, unfreeze_vision=unfreeze_vision)
    out: dict[str, int] = {}

    # ---- vision tower: every tile; patch Conv2d on the patches, blocks on the patches (+ CLS) ----
    v = model.vision
    cfg = v.model.config
    patches = v.grid * v.grid
    seq_v = patches + int(v.has_cls)
    conv = sum(m.weight.numel() for m in v.model.modules() if isinstance(m, nn.Conv2d))
    # Only the Linears inside the stack of blocks (an nn.ModuleList) run on every token: no pooling heads.
    lin_v = sum(linear_numel(m) for m in v.model.modules() if isinstance(m, nn.ModuleList))
    heads_v = cfg.num_attention_heads
    width_v = heads_v * (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads_v)
    grad = parts["vision"]
    out["vision"] = tokens.tiles * (
        linear_flops(conv, patches, grad, False)
        + linear_flops(lin_v, seq_v, grad, grad)
        + cfg.num_hidden_layers * attention_flops(width_v, seq_v, seq_v, grad)
    )

    # ---- projector: all tiles' pixel-shuffled tokens ----
    tok_p = tokens.tiles * v.tokens_per_tile
    out["projector"] = 0
    # registration order is forward order: LayerNorm, Linear, GELU, Linear (D/H) or one Linear (X)
    for m in model.projector.modules():
        if isinstance(m, nn.Linear):
            out["projector"] += linear_flops(m.weight.numel(), tok_p, parts["projector"], grad)
        # any trainable weight (a Linear's, the LayerNorm's affine) puts what follows on the gradient path
        grad = grad or (parts["projector"] and any(True for _ in m.parameters(recurse=False)))
    features_grad = grad  # do the projected tile features carry a gradient?

    # ---- decoder, with x-attn blocks before their scheduled layers ----
    arch = model.config.arch
    dims = model.dims
    t = tokens.decoder
    # The decoder input needs a gradient when the embedding trains, or when it holds tile features (D: all
    # tiles, H: the thumbnail) from a trainable projector. NVLM-X's decoder holds text only.
    grad = parts["llm"] or (arch != "X" and features_grad)
    # H's memory also holds the tile tags' text embeddings, which train with the LLM.
    memory_grad = features_grad or (arch == "H" and parts["llm"])
    blocks = dict(zip(model.xattn_layers, model.xattn, strict=True))
    out["xattn"] = out["llm"] = out["llm_attention"] = 0
    for i, layer in enumerate(decoder_layers(model.llm)):
        if i in blocks and tokens.memory > 0:  # no memory (a lone-tile H image): the blocks are skipped
            block = blocks[i]
            assert isinstance(block, GatedCrossAttentionBlock)  # what NVLM.xattn holds
            out["xattn"] += xattn_flops(block, t, tokens.memory, parts["xattn"], grad, memory_grad)
            grad = grad or parts["xattn"]
        out["llm"] += linear_flops(linear_numel(layer), t, parts["llm"], grad)
        out["llm_attention"] += attention_flops(dims.num_heads * dims.head_dim, t, t, grad or parts["llm"])
        grad = grad or parts["llm"]
    head = model.llm.get_output_embeddings().weight.numel()  # logits at every position, as the loss takes
    out["lm_head"] = linear_flops(head, t, parts["llm"], grad)
    out["total"] = sum(out.values())
    return out


def xattn_flops(
    block: GatedCrossAttentionBlock, t_q: int, t_kv: int, trains: bool, grad_in: bool, memory_grad: bool
) -> int:
    """One gated cross-attention block: k/v projections over the memory, the rest over text."""
    kv = block.k_proj.weight.numel() + block.v_proj.weight.numel()
    q = block.q_proj.weight.numel()
    rest = linear_numel(block) - kv - q  # o_proj and the FFN: their inputs depend on trained q/k/v
    # q_proj reads RMSNorm(x), whose weight trains with the block: its input needs a gradient then
    q_grad = grad_in or (trains and any(True for _ in block.input_norm.parameters()))
    inner_grad = trains or grad_in or memory_grad
    return (
        linear_flops(kv, t_kv, trains, memory_grad)
        + linear_flops(q, t_q, trains, q_grad)
        + attention_flops(block.num_heads * block.head_dim, t_q, t_kv, inner_grad)
        + linear_flops(rest, t_q, trains, inner_grad)
    )


def batch_flops(
    model: NVLM, batch: dict, stage: str = "sft", *, freeze_llm: bool = False, unfreeze_vision: bool = False
) -> int:
    """Training FLOPs of one collated micro-batch, from its shapes alone (no device sync): B rows of T decoder
    tokens (padding and packed rows counted in full, attention as one causal T×T per row) with an x-attn
    memory of M tokens, and the batch's tiles through the vision tower and projector."""
    rows, t = batch["input_ids"].shape
    pixels = batch.get("pixel_values")
    tiles = 0 if pixels is None else int(pixels.shape[0])
    index = batch.get("memory_index")
    memory = 0 if index is None or index.dim() < 2 else int(index.shape[1])
    f = train_flops(model, SampleTokens(t, memory, 1), stage, freeze_llm=freeze_llm, unfreeze_vision=unfreeze_vision)
    per_tile = f["vision"] + f["projector"]
    return rows * (f["total"] - per_tile) + tiles * per_tile
