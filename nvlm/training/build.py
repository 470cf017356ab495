"""Building the model a training run trains: from backbone folders or configs, from a stage-1 checkpoint
(paper §4.5: stage 2 starts from stage 1's model), on the meta device, and sharded over processes."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import nvlm
from nvlm.distributed.parallel import World, parallelize
from nvlm.models.llm import decoder_layers
from nvlm.models.lora import ADAPTERS, apply_lora
from nvlm.models.xattn import CrossAttentionDecoderLayer
from nvlm.training.config import ConfigError, RunConfig
from nvlm.training.stages import apply_stage
from nvlm.vision.encoder import vision_config


def build_model(cfg: RunConfig, meta: bool = False) -> nvlm.NVLM:
    """The run's model; `meta=True`: the same modules on the meta device, no weight read (for sharding).
    With ``train.lora`` its PEFT adapters are injected here, right after the build, so that the random
    adapter weights are drawn at the same point of the seeded stream on 1 process as on process 0 of N."""
    model = _build(cfg, meta)
    if cfg.train.lora.enabled:
        apply_lora(model, cfg.train.lora)
    return model


def _build(cfg: RunConfig, meta: bool) -> nvlm.NVLM:
    spec = cfg.model
    if spec.init_from and any((Path(spec.init_from) / d / "adapter_config.json").is_file() for d in ADAPTERS.values()):
        # checked on every process before any build, so a sharded run fails everywhere instead of hanging
        raise ConfigError(
            f"model.init_from={spec.init_from} holds LoRA adapters; fold them in first: "
            f"nvlm merge {spec.init_from} MERGED, then model.init_from=MERGED"
        )
    torch.manual_seed(cfg.train.seed)  # random-init backbones are then the same on every (re)start
    if spec.init_from:
        from nvlm.models.pretrained import meta_from_pretrained

        return meta_from_pretrained(spec.init_from) if meta else nvlm.from_pretrained(spec.init_from)
    llm, vision = spec.llm, spec.vision
    if isinstance(vision, dict):  # {"type": ..., **hf config}: a random vision tower
        vision = dict(vision)
        vision = vision_config(vision.pop("type"), **vision)
    tokenizer = spec.tokenizer or (llm if isinstance(llm, (str, os.PathLike)) else None)
    overrides = dict(spec.overrides)
    if not meta:
        return nvlm.build(spec.arch, llm=llm, vision=vision, tokenizer=tokenizer, config=overrides)
    from nvlm.models.llm import load_llm_config
    from nvlm.vision.encoder import load_vision_config

    if isinstance(llm, (str, os.PathLike)):
        llm = load_llm_config(llm)
    if isinstance(vision, (str, os.PathLike)):
        vision = load_vision_config(vision)
    with torch.device("meta"):
        return nvlm.build(spec.arch, llm=llm, vision=vision, tokenizer=tokenizer, config=overrides)


def build_sharded(cfg: RunConfig, world: World) -> nvlm.NVLM:
    """Every process builds the model on the meta device, shards it, and reads its own block of every weight
    from the backbones' safetensors (``nvlm.distributed.sharded_load``): no process holds the full model,
    nothing is broadcast. Models that module does not handle (an LLM from a config, LoRA, the released NVLM-D
    layout) are loaded by process 0 alone and broadcast, tensor by tensor."""
    from nvlm.distributed import sharded_load

    t = cfg.train
    plan = sharded_load.plan(cfg)
    real = build_model(cfg) if world.main and plan is None else None
    model = build_model(cfg, meta=True)
    apply_stage(model, t.stage, freeze_llm=t.freeze_llm, unfreeze_vision=t.unfreeze_vision)
    if t.activation_checkpointing:
        activation_checkpointing(model)
    parallelize(model, mesh=world.mesh, mixed_precision=t.bf16 and world.device.type == "cuda", compile=t.compile)
    model.to_empty(device=world.device)
    if plan is not None:
        sharded_load.load(model, plan)
    else:
        _broadcast_from_main(model, real)
    return model


def _broadcast_from_main(model: nvlm.NVLM, real: nvlm.NVLM | None) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = real.state_dict() if real is not None else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    real_buffers = dict(real.named_buffers()) if real is not None else {}
    for name, buf in model.named_buffers():  # e.g. RoPE's inv_freq: not in the state dict, empty after meta
        if real is not None:
            buf.copy_(real_buffers[name])
        dist.broadcast(buf, src=0)


def activation_checkpointing(model: nvlm.NVLM) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations. A layer with a gated
    cross-attention block is recomputed together with its block (``CrossAttentionDecoderLayer``); the others
    use transformers' own per-layer checkpointing."""
    model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for layer in decoder_layers(model.llm):
        if isinstance(layer, CrossAttentionDecoderLayer):
            layer.layer.gradient_checkpointing = False  # the wrapper's checkpoint covers block and layer
            layer.checkpointing = True
