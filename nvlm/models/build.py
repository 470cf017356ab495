"""The one way an NVLM model is constructed: ``skeleton(config)``, its backbones on the meta device.

Every path that makes a model goes through here: composing a new model from backbone folders, loading our
checkpoint or the released NVLM-D-72B layout (``nvlm.loading``), the training run on one process or sharded
over many (``nvlm.training.build``), the memory planner and the benchmarks. A skeleton's backbones (the LLM and
the vision tower) are shapes only, unless they come from configs without weights (random towers for tiny and
test models); a loader then fills them, whole on one process or a block per process when sharded. NVLM's own
modules are drawn from the global random stream on the host, in the same order on every process, so one
process and N processes build the same model from the same seed: the projector and resampler (small) whole, the
x-attn blocks (≈ 35 GB in fp32 at 72B) as a seed taken off the stream, from which a loader draws each process's
block only (``nvlm.models.xattn_init``).

A new model's NVLM tokens are added to its tokenizer first (``nvlm.data.processor.add_nvlm_tokens``); the
LLM's embeddings then grow to the tokenizer's length, the added rows drawn from a seed taken off the global
stream (``nvlm.models.llm.resize_embeddings``), which a loader uses to draw the same rows without the matrices.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, NamedTuple, cast

import torch

from nvlm.config import LLMConfig, NVLMConfig, VisionConfig, apply_overrides, clean_hf_config
from nvlm.models.llm import llm_config as llm_hf_config
from nvlm.models.llm import load_llm, resize_embeddings
from nvlm.models.nvlm import NVLM
from nvlm.vision.encoder import VisionKind, VisionTower, vision_model_from_config
from nvlm.vision.encoder import vision_config as make_vision_config


def new_config(
    arch: str, llm_config: Any, vision_kind: VisionKind, vision_config: Any, overrides: dict[str, Any]
) -> NVLMConfig:
    """NVLM-`arch`'s config over backbone config objects, before its tokens are added (the LLM's vocabulary is
    still the backbone's: ``skeleton`` grows it). `overrides`: dotted config keys."""
    # `arch` is any string here: validate() checks it
    cfg = apply_overrides(NVLMConfig(arch=cast(Any, arch), vision=VisionConfig(type=vision_kind)), overrides)
    cfg.llm = LLMConfig(hf_config=clean_hf_config(llm_config.to_dict()))
    cfg.vision.hf_config = clean_hf_config(vision_config.to_dict())
    return cfg.validate()


class Skeleton(NamedTuple):
    model: NVLM
    seed: int | None  # the added embedding rows' (None: no rows added)
    xattn_seed: int | None  # the x-attn blocks' (None: none to draw; they come from files, or there are none)


def skeleton(
    config: NVLMConfig,
    *,
    vocab_size: int | None = None,
    llm_weights: bool = False,
    vision: VisionTower | None = None,
    vision_weights: bool = False,
    llm_dtype: torch.dtype | None = None,
    vision_dtype: torch.dtype | None = None,
    own_weights: bool = True,
) -> Skeleton:
    """NVLM-`config.arch` with meta backbones and real own modules (x-attn blocks: meta, and their seed); returns
    it and the seeds a loader draws the added embedding rows and the x-attn blocks from.

    `vocab_size`: the tokenizer's length, when it outgrew the LLM's embeddings (a new model: the rows are
    added here, their seed returned; None: the config's vocabulary is final). `llm_weights` / `vision_weights`:
    draw that backbone's random weights for real instead of on meta (a backbone given as a config, no
    weights to load). `vision`: a tower already loaded (a format that is renamed on load). `llm_dtype` /
    `vision_dtype`: each backbone's dtype (a loader passes the dtype its weights were saved in; None: float32).
    `own_weights=False`: NVLM's own modules on meta too (a saved model: they are in its files).
    The config's ``llm.hf_config`` follows the grown LLM."""
    from accelerate import init_empty_weights  # type: ignore[import-untyped]

    def backbone(real: bool) -> Any:  # parameters on meta; buffers (RoPE's inv_freq) real, they are in no file
        return nullcontext() if real else init_empty_weights(include_buffers=False)

    with backbone(llm_weights):
        llm = load_llm(dict(config.llm.hf_config), llm_dtype)
    if vision is None:
        with backbone(vision_weights):
            vision = vision_model_from_config(config.vision.type, config.vision.hf_config)
            vision = cast(Any, vision).to(vision_dtype) if vision_dtype is not None else vision
    seed = resize_embeddings(llm, vocab_size) if vocab_size is not None else None
    llm.tie_weights()  # meta parameters registered afresh are untied; the loaded ones are tied again
    config.llm.hf_config = clean_hf_config(llm.config.to_dict())
    with backbone(own_weights):
        model = NVLM(config.validate(), llm, vision, xattn_device="meta")
    xattn_seed = int(torch.randint(2**62, (1,), device="cpu").item()) if own_weights and len(model.xattn) else None
    return Skeleton(model.eval(), seed, xattn_seed)


def meta_from_dicts(
    arch: str, llm_config: dict[str, Any], vision_config: dict[str, Any], overrides: dict[str, Any]
) -> NVLM:
    """NVLM-`arch` on the meta device from architecture dicts (the vision one with its ``type``), as the paper's
    recipes give them: no files, no tokenizer (NVLM's tokens fit in the LLM's padded vocabulary)."""
    vision = dict(vision_config)
    kind = vision.pop("type")
    config = new_config(arch, llm_hf_config(dict(llm_config)), kind, make_vision_config(kind, **vision), overrides)
    return meta_model(config)


def meta_model(config: NVLMConfig) -> NVLM:
    """Everything on the meta device, own modules too: shapes, names and parameter counts (plans, checks)."""
    with torch.device("meta"):
        return skeleton(config, own_weights=False).model


def saved_dtype(hf_json: dict[str, Any]) -> torch.dtype | None:
    """The dtype a Hugging Face folder's config.json says its weights were saved in (None: it says none)."""
    name = hf_json.get("dtype") or hf_json.get("torch_dtype")
    value = getattr(torch, str(name).removeprefix("torch."), None) if name else None
    return value if isinstance(value, torch.dtype) else None
