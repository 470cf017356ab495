"""Tensor parallelism within a node, composed with FSDP2 across nodes on a 2-D device mesh (paper §4.5 trains on
128 H100s; Megatron's NVLM scripts split every layer 8 ways; we use PyTorch's DTensor ``parallelize_module``, as
torchtitan does).

    tp, dp_shard = layout(world_size, cfg.train.tp, cfg.train.dp_shard)   # checked: tp × dp_shard = world
    mesh = device_mesh(world, tp, dp_shard)                                # dims ("dp_shard", "tp")
    apply_tensor_parallel(model, mesh["tp"])                               # before fully_shard over mesh["dp_shard"]

What is split (Megatron's column/row pairs, one all-reduce per pair in forward and one in backward):

- every LLM decoder layer: q, k, v column-wise (each rank holds num_heads/tp query heads and
  num_kv_heads/tp K/V heads), o row-wise; the MLP's gate and up column-wise, down row-wise. The names are the
  backbone's own (transformers' ``base_model_tp_plan``: ``layers.*.self_attn.q_proj: colwise`` ...);
- every gated cross-attention block (§4.3) the same way: q, k, v / o and gate, up / down.

Attention modules reshape with ``view(..., -1, head_dim)``, so a rank's projections simply yield its own heads;
the per-head q/k RMSNorms of the x-attn blocks stay whole on every rank, their gradients summed over the
TP group (``SequenceParallel`` over the heads dimension). What is not split is
replicated within the TP group (and sharded by FSDP across it): the norms (no sequence parallelism yet), the
embeddings and LM head, the projector and the frozen vision tower. Processes of one TP group hold the same
samples: their data-parallel rank is ``rank // tp`` (the mesh's dp coordinate).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nvlm.config import ConfigError
from nvlm.models.llm import decoder_layers
from nvlm.models.xattn import CrossAttentionDecoderLayer

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from nvlm.models.nvlm import NVLM

# transformers' own names (Qwen2Config/LlamaConfig.base_model_tp_plan), relative to one decoder layer
LLM_LAYER_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}
XATTN_BLOCK_PLAN = {
    "q_proj": "colwise",
    "k_proj": "colwise",
    "v_proj": "colwise",
    "o_proj": "rowwise",
    "gate_proj": "colwise",
    "up_proj": "colwise",
    "down_proj": "rowwise",
    # per-head norms, one weight shared by every head: a rank's gradient covers only its own heads, so the
    # weight is a replicated DTensor over inputs sharded by head ([B, T, H, hd] dim 2), whose gradient the
    # TP group sums (without this, 2 processes train q_norm/k_norm on half the heads' gradient)
    "q_norm": "heads",
    "k_norm": "heads",
}


def layout(world_size: int, tp: int, dp_shard: int) -> tuple[int, int]:
    """(tp, dp_shard) for `world_size` processes from ``train.tp`` and ``train.dp_shard`` (-1: world / tp);
    ConfigError naming the fix when they do not multiply to the world size. Their bounds are the run config's
    (``TrainConfig``), checked when it is read."""
    assert tp >= 1 and (dp_shard >= 1 or dp_shard == -1), f"unchecked layout tp={tp} dp_shard={dp_shard}"
    if world_size % tp:
        raise ConfigError(
            f"train.tp={tp} does not divide the {world_size} processes: use a tp that divides {world_size} "
            f"(e.g. the GPUs per node)"
        )
    if dp_shard == -1:
        dp_shard = world_size // tp
    if tp * dp_shard != world_size:
        raise ConfigError(
            f"train.tp={tp} × train.dp_shard={dp_shard} = {tp * dp_shard} processes, but {world_size} run: "
            f"set train.dp_shard={world_size // tp} or -1"
        )
    return tp, dp_shard


def check_heads(model: NVLM, tp: int) -> None:
    """ConfigError unless `tp` splits every attention's query and K/V heads (and the x-attn blocks') evenly."""
    if tp == 1:
        return
    cfg = model.llm.config
    counts = {"num_attention_heads": cfg.num_attention_heads}
    counts["num_key_value_heads"] = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    for block in model.xattn[:1]:
        counts["x-attn num_heads"], counts["x-attn num_kv_heads"] = block.num_heads, block.num_kv_heads
    bad = {k: v for k, v in counts.items() if v % tp}
    if bad:
        fits = [d for d in range(1, max(counts.values()) + 1) if all(v % d == 0 for v in counts.values())]
        raise ConfigError(f"train.tp={tp} does not divide the attention heads {bad}: use train.tp in {fits}")


def device_mesh(device_type: str, tp: int, dp_shard: int) -> DeviceMesh:
    """The 2-D mesh ("dp_shard", "tp") over the default process group: a TP group is `tp` consecutive ranks
    (one node's GPUs), so a process's data-parallel rank is ``rank // tp``."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dp_shard, tp), mesh_dim_names=("dp_shard", "tp"))


def tp_plans(model: NVLM) -> list[tuple[str, nn.Module, dict[str, str]]]:
    """(name, module, {submodule: "colwise" | "rowwise"}) for every module that tensor parallelism splits."""
    plans: list[tuple[str, nn.Module, dict[str, str]]] = []
    for i, layer in enumerate(decoder_layers(model.llm)):
        inner = layer.layer if isinstance(layer, CrossAttentionDecoderLayer) else layer
        plans.append((f"llm.layers.{i}", inner, LLM_LAYER_PLAN))
    plans += [(f"xattn.{i}", block, XATTN_BLOCK_PLAN) for i, block in enumerate(model.xattn)]
    return plans


def tp_sharded(model: NVLM) -> set[int]:
    """ids of the parameters tensor parallelism splits, read off the runtime's plans (``tp_plans``): the weights
    of the column- and row-parallel projections of every decoder layer and x-attn block, and the column-parallel
    ones' biases (a row-parallel bias is added after the all-reduce: whole). Embeddings, LM head, norms, LoRA
    adapters, the projector and the vision tower stay whole on every tp rank."""
    out: set[int] = set()
    for _, module, plan in tp_plans(model):
        for sub, style in plan.items():
            if style not in ("colwise", "rowwise"):
                continue
            m = module.get_submodule(sub)
            base = getattr(m, "base_layer", m)  # a LoRA-wrapped Linear: PEFT's base layer is what is split
            out.add(id(base.weight))
            if style == "colwise" and base.bias is not None:
                out.add(id(base.bias))
    return out


def shard_elements(p: nn.Parameter, dp: int, tp: int = 1) -> int:
    """Elements of `p` on the busiest rank: FSDP2 splits dim 0 in `dp` chunks, the first ones rounded up,
    of the tp rank's slice (numel / tp) when tensor parallelism splits `p` (tp > 1)."""
    if p.dim() == 0:
        return 1
    rows = math.ceil(p.shape[0] / tp)  # a row-parallel split of dim 1 gives the same count to within rounding
    return math.ceil(rows / dp) * (p.numel() // max(p.shape[0], 1))


def apply_tensor_parallel(model: NVLM, tp_mesh: DeviceMesh) -> None:
    """Split the LLM's and the x-attn blocks' projections over `tp_mesh` in place (before ``fully_shard``).
    Column-wise layers return their local shard (the rank's heads / FFN columns); row-wise layers take it and
    return the full, all-reduced output, so everything between the pairs runs on plain local tensors."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        ParallelStyle,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    check_heads(model, tp_mesh.size())

    def style(kind: str) -> ParallelStyle:
        if kind == "heads":
            return SequenceParallel(sequence_dim=2, use_local_output=True)
        return ColwiseParallel() if kind == "colwise" else RowwiseParallel()

    for _, module, plan in tp_plans(model):
        parallelize_module(module, tp_mesh, {name: style(kind) for name, kind in plan.items()})


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` for gradients that live on different meshes (2-D TP+FSDP weights beside 1-D FSDP
    ones), which one foreach norm refuses: the norm per (mesh, placements) group, made whole, then combined;
    each group is then scaled by the same factor."""
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        g = p.grad
        if g is not None:
            key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else (None, g.device)
            groups.setdefault(key, []).append(p)
    norms = []
    for group in groups.values():
        norm = get_total_norm([p.grad for p in group if p.grad is not None])
        norms.append((_whole_norm(norm) if isinstance(norm, DTensor) else norm).float().cpu())
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    for group in groups.values():
        clip_grads_with_norm_(group, max_norm, total)
    return total


def _whole_norm(norm: Any) -> torch.Tensor:
    """A 2-norm that is partial over some mesh dimensions (each rank holds the norm of its own block), made whole:
    the squares summed over each partial dimension's group in turn. (``full_tensor`` does the same two
    all-reduces on a 2-D mesh, and warns about it on every step.)"""
    import torch.distributed as dist

    sq = norm.to_local().float() ** 2
    for dim, placement in enumerate(norm.placements):
        if placement.is_partial():
            dist.all_reduce(sq, group=norm.device_mesh.get_group(dim))
    return sq.sqrt()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard, gathered one mesh dimension at a time (one collective each, in an
    order DTensor accepts for FSDP's strided shards of TP shards); a plain tensor is returned as it is."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(t, DTensor):
        return t
    placements = list(t.placements)
    for dim in range(len(placements)):
        if not placements[dim].is_replicate():
            placements[dim] = Replicate()
            t = t.redistribute(t.device_mesh, placements)
    return t.to_local()
