"""Scale-out applied from outside the model: torchrun process groups and FSDP2 sharding (paper §4.5 trains
NVLM on 128 H100s; we use PyTorch's own stack, as torchtitan does).

    world = init_world(step_timeout_s)          # torchrun's env → process group (NCCL on GPU, gloo on CPU)
    world = with_layout(world, tp, dp_shard)    # the 2-D mesh ("dp_shard", "tp"), see ``tensor_parallel``
    parallelize(model, mesh=world.mesh, mixed_precision=True)  # TP, compile, then fully_shard per block
    start_steps(world)                          # from now on a collective waits step_timeout_s, not start-up's

``fully_shard`` is applied once per LLM decoder layer, per gated cross-attention block, per vision-encoder
layer, to the vision tower as its own unit, to the input embeddings and to the final norm + LM head, and
last to the whole model (the projector and anything left). Each unit's weights are gathered just before
its forward and freed after; gradients are reduce-scattered per unit. Frozen parameters (stage 1's LLM, the
vision tower) are sharded too but get no gradient and no optimizer state; gradients still flow through the
frozen LLM to the projector. On GPU, frozen weights are stored in bf16 and trainable ones in fp32 (the
optimizer's master copy), computed in bf16 with fp32 gradient reduction.

Order (torchtitan's): activation checkpointing is switched on first (each decoder layer checkpoints itself when
called: transformers' per-layer checkpointing, or ``CrossAttentionDecoderLayer`` for a layer with an x-attn
block); ``parallelize`` then splits projections over the TP mesh, compiles each decoder layer and x-attn block
(only attention and MLP of a layer that checkpoints itself; never the checkpointing call itself, so it stays
eager and recomputes the compiled forwards in backward: ``compile_targets``), and last applies ``fully_shard``
over the dp mesh.

The model never imports ``nvlm.distributed``. What shards or communicates lives in this package: this file
(process groups, FSDP2, the trainer's all-reduces), ``tensor_parallel`` (DTensor plans) and ``dcp``
(checkpoints); outside it, ``nvlm.training.build`` broadcasts from process 0 the models the files cannot give
block by block, and ``nvlm.models.fill`` reads each process's block of a DTensor it is handed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from nvlm.distributed.tensor_parallel import apply_tensor_parallel, device_mesh, layout
from nvlm.errors import UserError
from nvlm.models.llm import decoder_layers
from nvlm.models.xattn import CrossAttentionDecoderLayer

if TYPE_CHECKING:
    from nvlm.models.nvlm import NVLM


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False  # launched by torchrun (even with one process): FSDP and DCP collectives
    tp: int = 1  # tensor-parallel degree: processes rank//tp*tp ... +tp-1 form a TP group and read the same data
    mesh: Any = None  # the ("dp_shard", "tp") DeviceMesh of a distributed run (``with_layout``)
    step_timeout_s: float = 1800.0  # how long a collective may wait once training steps (``start_steps``)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """This process's data-parallel rank: which share of the samples it reads (its TP peers read the same)."""
        return self.rank // self.tp

    @property
    def dp_size(self) -> int:
        return self.size // self.tp


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


STARTUP_TIMEOUT_S = 3600.0
"""How long a collective may wait during start-up (model build, weight loading, resume), which on a large
model far exceeds one training step; ``start_steps`` then lowers it to ``train.collective_timeout_s``."""
FLIGHT_RECORDER_ENV = {
    "TORCH_FR_BUFFER_SIZE": "2000",  # the flight recorder: the last 2000 collectives per process (torch 2.13's
    # name; the older TORCH_NCCL_TRACE_BUFFER_SIZE still works but warns, and a user's setting of it wins)
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # written to a file when a collective times out
}
"""Set before the process group starts unless the user set them. The dump goes to
``TORCH_FR_DUMP_TEMP_FILE`` + rank: ``RUN/flight_recorder/rank_N`` when ``init_world`` is given the run folder,
else torch's default /tmp/nccl_trace_rank_N. Read: ``python -m torch.distributed.flight_recorder.fr_trace DIR``."""


def flight_recorder_env(dump_dir: str | os.PathLike | None) -> dict[str, str]:
    """The variables ``init_world`` sets (those the user has not set already)."""
    env = dict(FLIGHT_RECORDER_ENV)
    if dump_dir is not None:
        env["TORCH_FR_DUMP_TEMP_FILE"] = str(Path(dump_dir) / "rank_")
    if "TORCH_NCCL_TRACE_BUFFER_SIZE" in os.environ:
        env.pop("TORCH_FR_BUFFER_SIZE")
    return {k: v for k, v in env.items() if k not in os.environ}


def use_cuda(device: str = "auto") -> bool:
    """Whether a run on `device` ("auto", "cpu" or "cuda", ``train.device``) uses the GPU; "cuda" without a
    visible GPU is a clear error rather than a crash in the first kernel."""
    if device == "cpu":
        return False
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise UserError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
    return available


def init_world(
    timeout_s: float = 1800.0,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    dump_dir: str | os.PathLike | None = None,
    train_device: str = "auto",
) -> World:
    """The process group from torchrun's environment, or a one-process world without one.

    A collective that waits for a process that never arrives (a crashed or hung rank) fails the run instead of
    hanging; torchrun then stops the other workers. Until ``start_steps`` the wait may last `startup_timeout_s`
    (loading a large model), then `timeout_s` per collective. NCCL's flight recorder is switched on and dumps
    to `dump_dir` (see ``FLIGHT_RECORDER_ENV``) on a timeout. `train_device`: ``train.device`` (``use_cuda``)."""
    cuda = use_cuda(train_device)
    if not launched_by_torchrun():
        return World(device=torch.device("cuda" if cuda else "cpu"), step_timeout_s=timeout_s)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    env = flight_recorder_env(dump_dir)
    if "TORCH_FR_DUMP_TEMP_FILE" in env:
        Path(dump_dir or ".").mkdir(parents=True, exist_ok=True)
    os.environ.update(env)  # read by the NCCL process group when it starts
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            timeout=timedelta(seconds=max(startup_timeout_s, timeout_s)),
            device_id=device if cuda else None,
        )
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device, True, step_timeout_s=timeout_s)


def with_layout(world: World, tp: int, dp_shard: int) -> World:
    """`world` with its parallel layout (``tensor_parallel.layout``) and, when distributed, its 2-D device mesh."""
    tp, dp_shard = layout(world.size, tp, dp_shard)
    mesh = device_mesh(world.device.type, tp, dp_shard) if world.distributed else None
    return replace(world, tp=tp, mesh=mesh)


def start_steps(world: World) -> None:
    """Start-up is over: every process group (the world's and the mesh's) now waits `world.step_timeout_s`."""
    if not world.distributed:
        return
    timeout = timedelta(seconds=world.step_timeout_s)
    groups = [None] + ([world.mesh.get_group(d) for d in world.mesh.mesh_dim_names] if world.mesh else [])
    for group in groups:
        dist.distributed_c10d._set_pg_timeout(timeout, group)  # the public init_process_group sets it once only


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


def compile_targets(model: NVLM) -> list[nn.Module]:
    """The modules whose ``forward`` ``train.compile`` compiles: each LLM decoder layer whole (its norms and
    residual adds fuse with the attention's and MLP's element-wise work: the cpu preset's D step against eager
    InternVL measured 1.13–1.15× compiled whole, 1.06× with attention + MLP alone, on one machine; 1.06× whole
    on another), each x-attn block, each layer of the vision tower and the projector (frozen or not, the tower
    runs every step; on the cpu preset's 4-layer tower the gain is within the noise: 1.06× without, 1.08× with).

    A layer that checkpoints itself (transformers' per-layer activation checkpointing) has only its attention and
    MLP compiled: transformers (5.x) checkpoints inside the layer's class-level ``forward``, so compiling the
    whole ``forward`` would trace the checkpoint into the graph as a tag that only some backends' partitioners
    honour (with "aot_eager" the layer kept every activation: 0 recomputations, as many bytes saved as without
    checkpointing). ``CrossAttentionDecoderLayer`` checkpoints around its block and layer by calling them as
    modules, so its layer is compiled whole either way; the checkpointing calls themselves stay eager and
    recompute the compiled forwards in backward."""
    targets: list[nn.Module] = []
    for m in decoder_layers(model.llm):
        layer: Any = m.layer if isinstance(m, CrossAttentionDecoderLayer) else m
        if getattr(layer, "gradient_checkpointing", False) and not isinstance(m, CrossAttentionDecoderLayer):
            targets += [layer.self_attn, layer.mlp]
        else:
            targets.append(layer)
    return [*targets, *model.xattn, *model.vision.layers, model.projector]


def compile_blocks(model: NVLM) -> None:
    """``torch.compile`` each of ``compile_targets`` in place. Call after activation checkpointing is switched
    on, which decides the targets."""
    compile_forwards(compile_targets(model))


def compile_forwards(modules: Iterable[nn.Module]) -> None:
    """Replace each module's ``forward`` by its compiled version (``compile_backend``); hooks on the module's
    call, such as FSDP's, stay eager."""
    backend = compile_backend()
    for m in modules:
        m.forward = torch.compile(m.forward, backend=backend)


def compile_backend() -> str:
    """torch.compile's backend: NVLM_COMPILE_BACKEND (e.g. "aot_eager" for CPU tests), else inductor."""
    return os.environ.get("NVLM_COMPILE_BACKEND", "inductor")


def parallelize(
    model: NVLM, *, mesh: Any = None, mixed_precision: bool = False, compile: bool = False, reduce_bf16: bool = False
) -> NVLM:
    """Parallelize `model` in place: tensor parallelism over ``mesh["tp"]`` (when its size is > 1), then
    ``torch.compile`` per block (`compile`), then FSDP2 over ``mesh["dp_shard"]`` (the default process group
    without a mesh). Call after ``apply_stage`` (so that which weights train is known) and after activation
    checkpointing is switched on.

    Trainable weights are kept in fp32. `mixed_precision` (GPU): frozen weights are stored in bf16; weights
    are gathered in bf16 and gradients reduced in fp32 (bf16 with `reduce_bf16`). `compile`: see
    ``compile_targets``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cast_for_training(model, mixed_precision)
    if mixed_precision:
        reduce = torch.bfloat16 if reduce_bf16 else torch.float32
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
    else:
        policy = MixedPrecisionPolicy()
    if mesh is not None and mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if compile:
        compile_blocks(model)  # FSDP hooks and checkpointing stay eager
    # FSDP2 warns when a unit returns a view (the x-attn block's K/V, the logits), because an in-place op on
    # it would skip its pre-backward hook; nothing here modifies a unit's output in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    dp_mesh = mesh["dp_shard"] if mesh is not None else None
    for name, modules in fsdp_units(model):
        # the head and the root run last in forward and first in backward: keep them gathered in between
        last = name in ("llm.norm+lm_head", "root")
        unit = modules if len(modules) > 1 else modules[0]
        fully_shard(unit, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=not last)
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
