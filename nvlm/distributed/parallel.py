"""Scale-out applied from outside the model: torchrun process groups and FSDP2 sharding (paper §4.5 trains
NVLM on 128 H100s; we use PyTorch's own stack, as torchtitan does).

    world = init_world()                      # torchrun's env → process group (NCCL on GPU, gloo on CPU)
    parallelize(model, mixed_precision=True)  # fully_shard per block, then the root

``fully_shard`` is applied once per LLM decoder layer, per gated cross-attention block, per vision-encoder
layer, to the vision tower as its own unit, to the input embeddings and to the final norm + LM head, and
last to the whole model (the projector and anything left). Each unit's weights are gathered just before
its forward and freed after; gradients are reduce-scattered per unit. Frozen parameters (stage 1's LLM, the
vision tower) are sharded too but get no gradient and no optimizer state; gradients still flow through the
frozen LLM to the projector. On GPU, frozen weights are stored in bf16 and trainable ones in fp32 (the
optimizer's master copy), computed in bf16 with fp32 gradient reduction.

The model never imports ``torch.distributed``; this file and ``nvlm.distributed.dcp`` are the only
places that shard or communicate.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from nvlm.models.llm import decoder_layers

if TYPE_CHECKING:
    from nvlm.models.nvlm import NVLM


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False  # launched by torchrun (even with one process): FSDP and DCP collectives

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init_world(timeout_s: float = 1800.0) -> World:
    """The process group from torchrun's environment, or a one-process world without one.

    `timeout_s` bounds how long a collective waits for a process that never arrives (a crashed or hung
    rank) before the run fails instead of hanging; torchrun then stops the other workers."""
    cuda = torch.cuda.is_available()
    if not launched_by_torchrun():
        return World(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s), device_id=device if cuda else None
        )
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device, True)


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(values: list[float], world: World, op: str = "sum") -> list[float]:
    """Sum (or max) a few floats over all processes; the identity in a one-process world."""
    if not world.distributed:
        return list(values)
    device = world.device if world.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


# ---- the sharding plan -----------------------------------------------------------------------------------
def vision_layers(model: NVLM) -> nn.ModuleList | None:
    """The vision tower's transformer layers: its largest ModuleList (InternViT, SigLIP and CLIP alike)."""
    lists = [m for m in model.vision.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def fsdp_units(model: NVLM) -> list[tuple[str, list[nn.Module]]]:
    """(name, modules) per FSDP unit, innermost first, the root last: the plan ``parallelize`` applies and
    ``nvlm train --dry-run`` prints."""
    llm = model.llm
    units: list[tuple[str, list[nn.Module]]] = []
    units += [(f"llm.layers.{i}", [layer]) for i, layer in enumerate(decoder_layers(llm))]
    units += [(f"xattn.{i}", [block]) for i, block in enumerate(model.xattn)]
    layers = vision_layers(model)
    units += [(f"vision.layers.{i}", [layer]) for i, layer in enumerate(layers or [])]
    units.append(("vision", [model.vision]))
    embed, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    if head is not None and head.weight is not embed.weight:  # tied: both stay in the root, shared
        units.append(("llm.embed_tokens", [embed]))
        norm = getattr(llm.get_decoder(), "norm", None)
        units.append(("llm.norm+lm_head", [norm, head] if norm is not None else [head]))
    units.append(("root", [model]))
    return units


def cast_for_training(model: nn.Module, mixed_precision: bool = False) -> None:
    """What trains is kept in fp32, the optimizer's master copy (released checkpoints are bf16; FSDP also
    needs one dtype per unit); with `mixed_precision` frozen weights are stored in bf16."""
    for p in model.parameters():
        if p.requires_grad or mixed_precision:
            p.data = p.data.to(torch.float32 if p.requires_grad else torch.bfloat16)


def parallelize(model: NVLM, *, mixed_precision: bool = False, compile: bool = False) -> NVLM:
    """Shard `model` in place with FSDP2 over the default process group. Call after ``apply_stage`` (so that
    which weights train is known) and after activation checkpointing is switched on.

    Trainable weights are kept in fp32. `mixed_precision` (GPU): frozen weights are stored in bf16; weights
    are gathered in bf16 and gradients reduced in fp32. `compile`: ``torch.compile`` each decoder layer's and x-attn
    block's forward (GPU; on CPU compilation costs more than it saves)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cast_for_training(model, mixed_precision)
    if mixed_precision:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    if compile:
        for block in [*decoder_layers(model.llm), *model.xattn]:
            block.forward = torch.compile(block.forward)  # hooks (FSDP, x-attn) stay eager around it
    # FSDP2 warns when a unit returns a view (the x-attn block's K/V, the logits), because an in-place op on
    # it would skip its pre-backward hook; nothing here modifies a unit's output in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    units = fsdp_units(model)
    for name, modules in units:
        # the head and the root run last in forward and first in backward: keep them gathered in between
        last = name in ("llm.norm+lm_head", "root")
        fully_shard(modules if len(modules) > 1 else modules[0], mp_policy=policy, reshard_after_forward=not last)
    return model


def reshard(model: nn.Module) -> None:
    """Free every gathered weight of a sharded model: after a forward that no backward follows (a stage-1
    micro-batch without images has nothing trainable on its path), FSDP would keep the root gathered."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def grad_norm(norm: torch.Tensor) -> float:
    """`clip_grad_norm_`'s result as a float; over sharded (DTensor) gradients it is gathered first."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)
