"""Building an NVLM model from a backbone LLM and a vision encoder (folders or config objects), and loading
it from nvlm's format (the layout is described in ``nvlm.models.saving``, which writes it). The backbones load
through the same ``from_pretrained`` calls a user's own checkpoint takes; no pickle, no remote code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file

from nvlm.config import LLMConfig, NVLMConfig, VisionConfig, apply_overrides, clean_hf_config
from nvlm.data.tags import all_tags
from nvlm.errors import UserError
from nvlm.models.llm import add_special_tokens, config_dict, load_llm, load_tokenizer, resize_embeddings
from nvlm.models.lora import ADAPTERS, load_adapters, merge_adapters
from nvlm.models.nvlm import NVLM
from nvlm.models.saving import OWN_PREFIXES
from nvlm.vision.encoder import load_vision_model


def build(
    arch: str = "D",
    llm: Any = None,
    vision: Any = None,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> NVLM:
    """Compose NVLM-`arch` from a local HF LLM folder (or config) and a vision encoder folder (or config).

    `tokenizer` defaults to the LLM folder. `overrides` are dotted config keys with dots as double
    underscores or a dict under `config=`: ``build("X", llm, vision, tags__style="2d_grid", xattn__every=4)``.
    """
    if llm is None or vision is None:
        raise ValueError("nvlm.build needs llm= (a local HF model folder or config) and vision= (same)")
    if tokenizer is None:
        if not isinstance(llm, (str, os.PathLike)):
            raise ValueError("nvlm.build: give tokenizer= (a folder or tokenizer object) when llm is a config")
        tokenizer = llm
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    llm_model = load_llm(llm, dtype)
    vision_model, kind = load_vision_model(vision)
    if dtype is not None:
        vision_model = vision_model.to(dtype)
    flat = dict(overrides.pop("config", {}))
    flat.update({k.replace("__", "."): v for k, v in overrides.items()})
    return compose(arch, llm_model, vision_model, kind, tokenizer, flat)[0]


def compose(
    arch: str, llm_model: Any, vision_model: Any, kind: Any, tokenizer: Any, flat: dict[str, Any]
) -> tuple[NVLM, int | None]:
    """NVLM-`arch` around loaded (or meta) backbones: NVLM's tokens added, embeddings grown, its own modules
    (projector, x-attn blocks) drawn from the global random stream. Returns the model and the seed of the added
    embedding rows (``nvlm.models.llm.resize_embeddings``)."""
    # `arch` is any string here: cfg.validate() below checks it
    cfg = apply_overrides(NVLMConfig(arch=cast(Any, arch), vision=VisionConfig(type=kind)), flat)
    _add_tokens(tokenizer, cfg, vision_model)
    seed = resize_embeddings(llm_model, len(tokenizer))
    cfg.llm = LLMConfig(hf_config=config_dict(llm_model))
    cfg.vision.hf_config = clean_hf_config(vision_model.config.to_dict())
    return NVLM(cfg.validate(), llm_model, vision_model, tokenizer), seed


def build_meta(
    arch: str, llm_config: dict[str, Any], vision_config: dict[str, Any], overrides: dict[str, Any] | None = None
) -> NVLM:
    """NVLM-`arch` from architecture dicts on the meta device: shapes and parameter counts, no memory, no
    weights, no tokenizer (for dry runs and recipe checks)."""
    from nvlm.vision.encoder import vision_config as make_vision_config

    vision = dict(vision_config)
    kind = vision.pop("type")
    with torch.device("meta"):
        llm_model = load_llm(dict(llm_config))
        vision_model, _ = load_vision_model(make_vision_config(kind, **vision))
        cfg = apply_overrides(
            NVLMConfig(arch=cast(Any, arch), vision=VisionConfig(type=kind)),  # validated below
            dict(overrides or {}),
        )
        cfg.llm = LLMConfig(hf_config=config_dict(llm_model))
        cfg.vision.hf_config = clean_hf_config(vision_model.config.to_dict())
        return NVLM(cfg.validate(), llm_model, vision_model, tokenizer=None)


def meta_from_pretrained(path: str | os.PathLike) -> NVLM:
    """The model ``from_pretrained(path)`` returns, on the meta device: same modules and names, no weight read
    (a sharded run builds this on every process and fills it from process 0)."""
    from nvlm.vision.encoder import vision_config as make_vision_config

    root = Path(path)
    cfg = NVLMConfig.load(root / "config.json")
    with torch.device("meta"):
        llm_model = load_llm(dict(cfg.llm.hf_config))
        vision_model, _ = load_vision_model(make_vision_config(cfg.vision.type, **cfg.vision.hf_config))
        return NVLM(cfg, llm_model, vision_model, load_tokenizer(root))


def _add_tokens(tokenizer: Any, cfg: NVLMConfig, vision_model: Any) -> None:
    """The image-pad token is always one token; in special-token mode so are the tags and image markers."""
    tokens = [cfg.tags.image_pad]
    if cfg.tags.mode == "special":
        size = vision_model.config.image_size
        size = size if isinstance(size, int) else size[0]
        tokens += [cfg.tags.image_start, cfg.tags.image_end]
        tokens += all_tags(cfg.tags.style, cfg.tags.thumbnail_tag, size, cfg.tiling.min_tiles, cfg.tiling.max_tiles)
    add_special_tokens(tokenizer, tokens)


def from_pretrained(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> NVLM:
    """Load a model written by ``save_pretrained``, or a folder in the released NVLM-D-72B layout (read by
    ``nvlm.interop.release``, its remote code never run)."""
    root = Path(path)
    from nvlm.interop.release import is_release, load_release

    if not (root / "llm").is_dir() and is_release(root):
        return load_release(root, dtype, device)
    if not (root / "config.json").is_file() or not (root / "llm").is_dir():
        raise FileNotFoundError(
            f"{root} is not an nvlm checkpoint (needs config.json and llm/); "
            "write one with model.save_pretrained or nvlm.build(...).save_pretrained"
        )
    cfg = NVLMConfig.load(root / "config.json")
    llm = load_llm(root / "llm", dtype)
    vision_model, _ = load_vision_model(root / "vision")
    if dtype is not None:
        vision_model = vision_model.to(dtype)
    model = NVLM(cfg, llm, vision_model, load_tokenizer(root))
    state = load_file(str(root / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(OWN_PREFIXES)]
    if missing or unexpected:
        raise ValueError(
            f"{root}/model.safetensors does not match NVLM-{cfg.arch}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    load_adapters(model, root)  # an adapter checkpoint (LoRA): applied at load time, not merged
    if dtype is not None:
        model.to(dtype)
    return model.to(device) if device is not None else model


def merge_checkpoint(src: str | Path, dst: str | Path) -> None:
    """``nvlm merge``: load an adapter checkpoint, fold its adapters in, save it as a plain nvlm checkpoint."""
    if not any((Path(src) / folder / "adapter_config.json").is_file() for folder in ADAPTERS.values()):
        raise UserError(f"{src}: no LoRA adapters there (no llm_adapter/adapter_config.json); nothing to merge")
    model = from_pretrained(src)
    merge_adapters(model)
    model.save_pretrained(str(dst))
