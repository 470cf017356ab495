"""The released NVLM-D-72B folder (``model_type NVLM_D``): its configs mapped to ours and back, loading it directly.

The folder, as downloaded from the hub, holds remote code (``auto_map`` → configuration_nvlm_d.py,
modeling_nvlm_d.py); none of it is imported or run here: its config.json is read as JSON and its weights as
safetensors. Facts we rely on (read from the released folder's config.json, weight index and modeling code):

* ``llm_config`` says ``model_type: "llama"`` but ``architectures: ["Qwen2ForCausalLM"]``, and the
  release's own code picks the class from ``architectures[0]``: so do we.
* ``vision_config`` is the original InternViT-6B config with the *real* head count (25); the weights are padded
  to 32 heads (``nvlm.interop.internvit``).
* ``mlp1`` = LayerNorm(4C) → Linear(no bias) → GELU → Linear(no bias): our NVLM-D projector, its hidden width
  the LLM's FFN size. ``ps_version "v2"`` is our pixel shuffle; "v1" (transposed tiles) is refused.
* On export, what vLLM's ``NVLM_D`` hard-codes decides what can be written (``exportable``), and the config
  gets the release's key set with the legacy names older transformers and vLLM read (``release_config``).
* The tokenizer is Qwen2.5's as shipped (``<|vision_pad|>`` is already a token), tags are plain text, and the
  prompt is the release's ``chat()`` string: our ``template="release"`` (see ``nvlm.data.chat``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import torch

from nvlm.config import LLMConfig, NVLMConfig, TagConfig, VisionConfig, clean_hf_config
from nvlm.interop.internvit import original_config_from_vit, side, take_real_heads, vit_config_from_original
from nvlm.interop.keymap import release_to_ours
from nvlm.interop.shards import folder_tensors
from nvlm.vision.tiling import IMAGENET_MEAN, IMAGENET_STD

RELEASE_TYPE = "NVLM_D"
# generation settings and other per-run fields of the 4.39-era llm_config that are no architecture
_NOT_ARCH = ("_name_or_path", "architectures", "model_type", "torch_dtype", "dtype", "transformers_version")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def is_release(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder in the release layout (config.json of model_type NVLM_D)."""
    cfg = read_json(Path(path) / "config.json")
    return cfg.get("model_type") == RELEASE_TYPE or RELEASE_TYPE in (cfg.get("architectures") or [])


def llm_model_type(llm_config: dict[str, Any]) -> str:
    """The transformers model_type of the release's LLM, from ``architectures[0]`` (not its "llama" model_type)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = (llm_config.get("architectures") or [None])[0]
    by_class = {cls: mt for mt, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}
    if arch in by_class:
        return by_class[arch]
    if llm_config.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return llm_config["model_type"]
    raise ValueError(f"release llm_config: architecture {arch!r} is not a transformers causal LM")


def llm_config_from_release(llm_config: dict[str, Any]) -> dict[str, Any]:
    """The release's ``llm_config`` → a transformers config dict (with model_type) holding only the keys its
    class knows (rope_theta / rope_scaling in the legacy names, which transformers still reads)."""
    from transformers import AutoConfig

    model_type = llm_model_type(llm_config)
    known = set(AutoConfig.for_model(model_type).to_dict()) | {"rope_theta", "rope_scaling"}
    kept = {k: v for k, v in llm_config.items() if k in known and k not in _NOT_ARCH}
    return {"model_type": model_type, **kept}


def nvlm_config_from_release(config: dict[str, Any], preprocessor: dict[str, Any]) -> NVLMConfig:
    """Our NVLMConfig (NVLM-D, 1-D text tags, release template) for a release config.json."""
    from transformers import AutoConfig, InternVLVisionConfig

    if config.get("ps_version", "v1") != "v2":
        raise ValueError(
            f"release config: ps_version {config.get('ps_version')!r} is not supported; NVLM uses "
            "pixel shuffle v2 (v1 transposes every tile)"
        )
    vit = InternVLVisionConfig(**vit_config_from_original(config["vision_config"]))
    tile = int(config.get("force_image_size") or side(vit.image_size))
    if tile != side(vit.image_size):
        raise ValueError(
            f"release config: force_image_size {tile} differs from the vision tower's image_size "
            f"{side(vit.image_size)} (resized position embeddings are not supported)"
        )
    size = preprocessor.get("crop_size", preprocessor.get("size", tile))
    size = size.get("height", tile) if isinstance(size, dict) else size
    if int(size) != tile:
        raise ValueError(f"release preprocessor_config.json: size {size} differs from the tile size {tile}")
    llm = llm_config_from_release(config["llm_config"])
    llm_cfg = AutoConfig.for_model(llm.pop("model_type"), **llm)
    mean = tuple(preprocessor.get("image_mean", IMAGENET_MEAN))
    std = tuple(preprocessor.get("image_std", IMAGENET_STD))
    cfg = NVLMConfig(arch="D", template="release", tags=TagConfig(style="1d", mode="text"))
    cfg.vision = VisionConfig(
        type="internvl",
        hf_config=clean_hf_config(vit.to_dict()),
        select_layer=config.get("select_layer", -1),
        downsample=config.get("downsample_ratio", 0.5),
        image_mean=mean,
        image_std=std,
    )
    cfg.tiling.min_tiles = config.get("min_dynamic_patch", 1)
    cfg.tiling.max_tiles = config.get("max_dynamic_patch", 6) if config.get("dynamic_image_size", True) else 1
    cfg.tiling.use_thumbnail = bool(config.get("use_thumbnail", True))
    cfg.llm = LLMConfig(hf_config=clean_hf_config(llm_cfg.to_dict()))
    return cfg.validate()


def load_config(path: str | os.PathLike) -> NVLMConfig:
    root = Path(path)
    return nvlm_config_from_release(read_json(root / "config.json"), read_json(root / "preprocessor_config.json"))


def release_processor(path: str | os.PathLike) -> Any:
    """The processor of a release folder: its tokenizer, and our config read from its config files."""
    from transformers import AutoTokenizer, PretrainedConfig

    from nvlm.data.processor import Processor

    root = Path(path)
    cfg = load_config(root)
    # a neutral config: AutoTokenizer would otherwise parse config.json (NVLM_D, unknown to transformers) and warn;
    # the tokenizer class comes from tokenizer_config.json (Qwen2Tokenizer in the release)
    tokenizer = AutoTokenizer.from_pretrained(root, config=PretrainedConfig(), trust_remote_code=False)
    cfg.image_token_id = int(cast(int, tokenizer.convert_tokens_to_ids(cfg.tags.image_pad)))
    return Processor(tokenizer, cfg)


def load_release(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    keep: tuple[str, ...] | None = None,
) -> Any:
    """NVLM-D and its processor from a release folder: built on the meta device, then filled tensor by tensor,
    each tensor read from its shard straight to `device` in `dtype` (no full copy on the host first).

    Dtypes follow ``nvlm.from_pretrained`` on our format: with `dtype` None the backbones keep the stored dtype
    and the projector is fp32; with a dtype, everything is cast to it. `quantize`: the LLM's Linears are
    quantized after each shard (``nvlm.inference.quantize``), so at most one shard is held in full precision."""
    from nvlm.inference.quantize import Quantizer
    from nvlm.inference.schemes import DEFAULT_KEEP
    from nvlm.models.build import meta_model

    root = Path(path)
    processor = release_processor(root)
    model = meta_model(processor.config)  # every tensor is in the release's shards, the projector's too
    vit = model.vision.model.config
    heads, head_dim = vit.num_attention_heads, vit.hidden_size // vit.num_attention_heads
    params = dict(model.named_parameters())
    target = torch.device(device) if device is not None else torch.device("cpu")
    quantizer = Quantizer(model, quantize, keep or DEFAULT_KEEP, dtype, target) if quantize else None
    loaded: set[str] = set()
    by_file: dict[Path, dict[str, Any]] = {}
    for name, ref in folder_tensors(root).items():
        by_file.setdefault(ref.file, {})[name] = ref
    for refs in by_file.values():  # one shard at a time: at most one shard's tensors are held before assignment
        part: dict[str, torch.Tensor] = {}
        for name, ref in refs.items():
            tensor = ref.read()
            try:
                targets = release_to_ours(name)
            except KeyError:
                raise ValueError(f"{root}: weight {name!r} is not part of NVLM-D's release layout") from None
            for m in targets:
                if m.name not in params:
                    raise ValueError(f"{root}: weight {name!r} has no place in the model ({m.name})")
                want = dtype or (params[m.name].dtype if m.name.startswith("projector.") else tensor.dtype)
                part[m.name] = take_real_heads(tensor, m, heads, head_dim, f"{root.name}:{name}").to(target, want)
            del tensor
        model.load_state_dict(part, strict=False, assign=True)
        loaded.update(part)
        del part
        if quantizer is not None:
            quantizer.filled_so_far(model)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{root}: weights missing for {missing[:5]} ({len(missing)} in all)")
    _rebuild_buffers(model, target)
    if model.llm.config.tie_word_embeddings:
        model.llm.tie_weights()
    if quantizer is not None:
        quantizer.quantize_rest(model)
    elif dtype is not None:
        model.to(dtype)
    return model.eval(), processor


def _rebuild_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Buffers are not in any checkpoint (RoPE's inv_freq): recompute those still on the meta device by building
    their module again (HF modules with buffers take their model's config) on the CPU."""
    for name, module in model.named_modules():
        metas = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not metas:
            continue
        if not hasattr(module, "config"):
            raise ValueError(f"cannot rebuild the buffers {metas} of {name} ({type(module).__name__})")
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for n in metas:
            module._buffers[n] = getattr(fresh, n).to(device)


# ---- ours → release: what vLLM's NVLM_D loader and the release's code read -----------------------------------
def exportable(cfg: NVLMConfig, llm_json: dict[str, Any]) -> list[str]:
    """Why this model cannot be written in the release layout (empty: it can). vLLM's NVLM_D hard-codes these."""
    t, why = cfg.tags, []
    if cfg.arch != "D":
        why.append(f"NVLM-{cfg.arch} has cross-attention blocks; the release layout is decoder-only NVLM-D")
    if cfg.resampler.latents:
        why.append("the model has a Perceiver resampler (resampler.latents > 0); the release layout has none")
    if cfg.vision.type != "internvl":
        why.append(f"the vision tower is {cfg.vision.type}; the release layout holds an InternViT")
    if (t.style, t.mode, t.thumbnail_tag, t.image_start, t.image_end, t.image_pad) != (
        "1d",
        "text",
        "<tile_global_thumbnail>",
        "<Image>",
        "</Image>",
        "<|vision_pad|>",
    ):
        why.append(
            "tags must be 1-D plain text (<tile_k>, <tile_global_thumbnail>, <Image>…</Image>, <|vision_pad|>) "
            f"as vLLM's NVLM-D processor writes them; this model has {t.style}/{t.mode}"
        )
    if cfg.vision.downsample != 0.5:
        why.append("pixel shuffle must be on (downsample 0.5)")
    if cfg.projector.hidden_size not in (None, llm_json.get("intermediate_size")):
        why.append(
            f"the projector's hidden width {cfg.projector.hidden_size} must be the LLM's FFN size "
            "(vLLM sizes mlp1 from text_config.intermediate_size)"
        )
    if cfg.projector.layer_norm_eps != 1e-5:
        why.append("the projector's LayerNorm eps must be 1e-5 (the release's nn.LayerNorm default)")
    mean, std = cfg.vision.image_mean or IMAGENET_MEAN, cfg.vision.image_std or IMAGENET_STD
    if tuple(mean) != tuple(IMAGENET_MEAN) or tuple(std) != tuple(IMAGENET_STD):
        why.append("images must be normalised with ImageNet mean/std (vLLM hard-codes them)")
    return why


def release_config(cfg: NVLMConfig, llm_json: dict[str, Any], vit_json: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The release's config.json key set, from our config alone. No auto_map here: vLLM has its own NVLM_D config
    class; ``with_release_keys`` adds it (and the other keys) from the release's own config.json."""
    llm = {k: v for k, v in llm_json.items() if k not in ("dtype", "transformers_version", "rope_parameters")}
    rope = llm_json.get("rope_parameters") or {}
    kind = rope.get("rope_type", "default")
    llm["rope_theta"] = rope.get("rope_theta", llm_json.get("rope_theta", 10000.0))
    llm["rope_scaling"] = (
        None
        if kind == "default"
        else {**{k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type")}, "type": kind}
    )
    llm["torch_dtype"] = dtype
    tile = original_config_from_vit(vit_json)["image_size"]
    return {
        "architectures": ["NVLM_D"],
        "model_type": "NVLM_D",
        "downsample_ratio": cfg.vision.downsample,
        "dynamic_image_size": cfg.tiling.max_tiles > 1,
        "force_image_size": tile,
        "llm_config": llm,
        "max_dynamic_patch": cfg.tiling.max_tiles,
        "min_dynamic_patch": cfg.tiling.min_tiles,
        "ps_version": "v2",
        "select_layer": cfg.vision.select_layer,
        "template": "chatml",
        "torch_dtype": dtype,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": cfg.tiling.use_thumbnail,
        "vision_config": original_config_from_vit(vit_json, _dtype_name_of(vit_json, dtype)),
    }


def with_release_keys(ours: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """`ours` (``release_config``) with the keys of `base` (the release's own config.json; {} when there is
    none) that it lacks: ``auto_map``, ``_commit_hash``, ``transformers_version`` and the 4.39-era generation
    keys of ``llm_config``. Every architecture value is ours; the LLM's name, model_type and class stay the
    release's while its class is ours (the release's "llama" for Qwen2 is kept: the release's code reads it)."""
    if not base:
        return ours
    out = {**base, **ours}
    llm, base_llm = ours["llm_config"], base.get("llm_config") or {}
    merged = {**base_llm, **llm}
    if base_llm.get("architectures") == llm.get("architectures"):
        merged.update({k: base_llm[k] for k in ("_name_or_path", "model_type") if k in base_llm})
    out["llm_config"] = merged
    out["vision_config"] = {**(base.get("vision_config") or {}), **ours["vision_config"]}
    return out


def _dtype_name_of(hf_json: dict[str, Any], default: str) -> str:
    return hf_json.get("dtype") or hf_json.get("torch_dtype") or default
