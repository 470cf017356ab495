"""The model a training run trains, built the one way (``nvlm.models.build``) and prepared the one way.

``run_model`` gives the run's skeleton and processor: from backbone folders or configs, or from a stage-1
checkpoint (paper §4.5: stage 2 starts from stage 1's model). ``prepare`` then applies, in this order, what the
run asks: the stage (what trains), activation checkpointing, and either tensor parallelism + compile + FSDP over
the run's processes, or fp32 master weights + compile on one. One process fills the skeleton whole before
``prepare``; a sharded run prepares the skeleton on the meta device, then every process reads only its own block
of every weight (``nvlm.models.fill``): no process holds the full model, nothing is broadcast.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nvlm.data.processor import Processor
from nvlm.distributed.parallel import World, cast_for_training, compile_blocks, parallelize
from nvlm.loading import Unfilled, fill_whole, load, new_model, saved_model
from nvlm.models import fill
from nvlm.models.llm import decoder_layers
from nvlm.models.lora import ADAPTERS, apply_lora
from nvlm.models.nvlm import NVLM
from nvlm.models.xattn import CrossAttentionDecoderLayer
from nvlm.training.config import ConfigError, RunConfig, TrainConfig
from nvlm.training.stages import apply_stage
from nvlm.vision.encoder import vision_config


def run_model(cfg: RunConfig) -> Unfilled:
    """The run's skeleton, its processor and where its weights are: from the backbones, or from
    ``model.init_from``. Seeded by ``train.seed``, so every process and every restart draws the same own modules
    and random backbones."""
    spec = cfg.model
    if spec.init_from and any((Path(spec.init_from) / d / "adapter_config.json").is_file() for d in ADAPTERS.values()):
        # checked on every process before any build, so a sharded run fails everywhere instead of hanging
        raise ConfigError(
            f"model.init_from={spec.init_from} holds LoRA adapters; fold them in first: "
            f"nvlm merge {spec.init_from} MERGED, then model.init_from=MERGED"
        )
    torch.manual_seed(cfg.train.seed)
    if spec.init_from:
        return saved_model(spec.init_from)
    vision = spec.vision
    if isinstance(vision, dict):  # {"type": ..., **hf config}: a random vision tower
        vision = dict(vision)
        vision = vision_config(vision.pop("type"), **vision)
    tokenizer = spec.tokenizer or (spec.llm if isinstance(spec.llm, (str, os.PathLike)) else None)
    return new_model(spec.arch, spec.llm, vision, tokenizer, dict(spec.overrides))


def build_model(cfg: RunConfig, built: Unfilled | None = None) -> tuple[NVLM, Processor]:
    """The run's model on one process, filled, with its processor (`built`: ``run_model(cfg)`` made earlier).
    With ``train.lora`` its PEFT adapters are injected right after the weights, so their random weights are drawn
    at the same point of the seeded stream on 1 process as on N."""
    built = built or run_model(cfg)
    if built.folders:
        model = fill_whole(built, cfg.model.llm)
    else:  # a released NVLM-D folder: renamed as it is read
        model = load(str(cfg.model.init_from))[0]
    if cfg.train.lora.enabled:
        apply_lora(model, cfg.train.lora, built.processor.tokenizer)
    return model, built.processor


def build_sharded(cfg: RunConfig, world: World, built: Unfilled | None = None) -> tuple[NVLM, Processor]:
    """The run's model prepared over `world` (``prepare``), every process filling its own blocks (`built`:
    ``run_model(cfg)`` made earlier). What the files cannot give block by block (LoRA adapters, a released
    NVLM-D folder) is built whole on process 0 and broadcast, tensor by tensor."""
    built = built or run_model(cfg)
    model, plan = built.model, None if cfg.train.lora.enabled else built.plan()
    real = None
    if plan is None:
        real = build_model(cfg)[0] if world.main else None
        if cfg.train.lora.enabled:  # the same adapters on the skeleton, whose weights the broadcast then sets
            apply_lora(model, cfg.train.lora, built.processor.tokenizer)
    prepare(model, cfg.train, world)
    model.to_empty(device=world.device)
    if plan is not None:
        fill.load(model, plan)
    else:
        _broadcast_from_main(model, real)
    return model, built.processor


def prepare(model: NVLM, t: TrainConfig, world: World) -> NVLM:
    """What the run's settings do to a built model, in the one order every path takes: the stage (what trains),
    activation checkpointing, then over several processes tensor parallelism, compile and FSDP
    (``nvlm.distributed.parallel.parallelize``), or on one process fp32 master weights for what trains (as a
    sharded run keeps) and compile. `model` is filled (one process) or a skeleton still to fill (sharded)."""
    apply_stage(model, t.stage, freeze_llm=t.freeze_llm, unfreeze_vision=t.unfreeze_vision)
    if t.activation_checkpointing:
        activation_checkpointing(model)
    if world.distributed:
        mixed = t.bf16 and world.device.type == "cuda"
        return parallelize(model, mesh=world.mesh, mixed_precision=mixed, compile=t.compile, reduce_bf16=t.reduce_bf16)
    cast_for_training(model)
    if t.compile:
        compile_blocks(model)
    return model


def _broadcast_from_main(model: NVLM, real: NVLM | None) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = real.state_dict() if real is not None else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    real_buffers = dict(real.named_buffers()) if real is not None else {}
    for name, buf in model.named_buffers():  # e.g. RoPE's inv_freq: not in the state dict, empty after meta
        if real is not None:
            buf.copy_(real_buffers[name])
        dist.broadcast(buf, src=0)


def activation_checkpointing(model: NVLM) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations. A layer with a gated
    cross-attention block is recomputed together with its block (``CrossAttentionDecoderLayer``); the others
    use transformers' own per-layer checkpointing."""
    model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for layer in decoder_layers(model.llm):
        if isinstance(layer, CrossAttentionDecoderLayer):
            layer.layer.gradient_checkpointing = False  # the wrapper's checkpoint covers block and layer
            layer.checkpointing = True
