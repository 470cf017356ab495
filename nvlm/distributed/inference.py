"""Tensor-parallel inference: the training TP plans (``tensor_parallel.tp_plans``, Megatron's column/row pairs)
applied to a model that only runs forward, as plain per-rank shards with one all-reduce per pair (vLLM's layout).

    mesh = inference_mesh(world)            # one TP group of every process, ("tp",)
    split_for_inference(model, mesh)        # on the meta skeleton: the split Linears' weights become DTensors
    fill.load(model, plan, device, after=lambda name, m: localize(m, mesh))   # each rank reads its own rows

What is split is what training splits: every LLM decoder layer's q, k, v and MLP gate/up column-wise (a rank
holds num_heads/tp query heads, num_kv_heads/tp K/V heads and 1/tp of the FFN), o and down row-wise; the same in
every gated cross-attention block of NVLM-X/H. The DTensors only exist while loading, so that the sharded
loading training has (``nvlm.models.fill``: a rank reads the rows and columns of its block from the safetensors
files, nothing else) fills them; ``localize`` then swaps each for its local tensor and gives a row-parallel
Linear an all-reduce of its output (its bias added once, by rank 0). From there on the forward is the one-rank
forward on fewer heads: attention reshapes with ``view(..., -1, head_dim)``, the KV cache holds this rank's
K/V heads, everything between the pairs is replicated and identical on every rank, logits included. Plain
tensors also let torchao quantize a rank's shard like any Linear, and cost no DTensor dispatch per call.

What stays whole on every rank: embeddings, LM head, norms, the projector and the vision tower. The vision tower
is replicated, not split and not kept on rank 0 alone: every rank receives the step's batch (pixels included)
anyway, so without an encoder cache (``nvlm eval run``, ``nvlm chat``) each rank encodes the same tiles at the
same time, with no rank idle while another encodes and no feature transfer; with the server's encoder cache,
rank 0 encodes the images it misses and sends the batch's features with the step, so a cache hit spares every
rank the tower. The price is the tower's weights on every GPU (InternViT-6B ≈ 11 GiB in bf16), which the
inference memory plan counts per rank; splitting the tower too would save that at one all-reduce per ViT layer.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn

from nvlm.distributed.tensor_parallel import check_heads, tp_plans
from nvlm.errors import UserError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from nvlm.distributed.parallel import World
    from nvlm.models.nvlm import NVLM

CONTROL_TIMEOUT = timedelta(days=30)
"""How long a follower waits for rank 0's next step: a server may sit idle for days (a crashed rank 0 closes
its connections, which ends the wait at once)."""


def inference_mesh(world: World) -> DeviceMesh:
    """The 1-D ("tp",) mesh over every process of `world`: inference splits the model over all of them."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(world.device.type, (world.size,), mesh_dim_names=("tp",))


def control_group() -> Any:
    """A gloo group over every process for rank 0's step descriptions (host objects, also beside NCCL), whose
    waits last `CONTROL_TIMEOUT`."""
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def split_linears(model: NVLM) -> list[tuple[str, nn.Linear, str]]:
    """(name, Linear, "colwise" | "rowwise") of every projection the TP plans split."""
    out = []
    for prefix, module, plan in tp_plans(model):
        for sub, kind in plan.items():
            if kind in ("colwise", "rowwise"):
                out.append((f"{prefix}.{sub}", cast(nn.Linear, module.get_submodule(sub)), kind))
    return out


def split_for_inference(model: NVLM, mesh: DeviceMesh) -> None:
    """On a meta skeleton: make every split Linear's weight (and bias) a DTensor placed as the plan splits it
    (column-wise: rows, Shard(0); row-wise: columns, Shard(1), its bias whole), so that filling reads only this
    rank's block. UserError unless `tp` divides the heads and the FFN width."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    tp = mesh.size()
    try:
        check_heads(model, tp)
    except Exception as e:
        raise UserError(f"--tp {tp} / {tp} processes: {str(e).replace('train.tp', 'the TP degree')}") from None
    for name, linear, kind in split_linears(model):
        dim = 0 if kind == "colwise" else 1
        if linear.weight.shape[dim] % tp:
            raise UserError(f"{tp} processes do not split {name} ({linear.weight.shape[dim]} wide) evenly")
        for pname, p in list(linear.named_parameters(recurse=False)):
            place = Shard(dim) if pname == "weight" or kind == "colwise" else Replicate()
            # src_data_rank=None: no communication, each rank keeps its (meta) block
            dt = distribute_tensor(p.detach(), mesh, [place], src_data_rank=None)
            linear._parameters[pname] = nn.Parameter(dt, requires_grad=False)


def localize(module: nn.Module, group: Any) -> None:
    """After `module`'s tensors are filled: its DTensor parameters become their local blocks (plain tensors);
    a row-parallel Linear sums its output over `group` after its forward, its bias counted once (rank 0's)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(module, nn.Linear) or not isinstance(module.weight, DTensor):
        return
    rowwise = module.weight.placements[0] == Shard(1)
    for pname, p in list(module.named_parameters(recurse=False)):
        module._parameters[pname] = nn.Parameter(p.to_local(), requires_grad=False)  # type: ignore[attr-defined]
    module.out_features, module.in_features = module.weight.shape
    if rowwise:
        if module.bias is not None and dist.get_rank(group) != 0:
            module.bias.data.zero_()  # the sum over ranks adds the bias once
        module.register_forward_hook(_sum_over(group))


def _sum_over(group: Any) -> Any:
    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, group=group)  # the partial products of the rank's input columns → the whole output
        return out

    return hook
