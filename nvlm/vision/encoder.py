"""The vision encoder (paper §4.1): a Hugging Face vision tower, layer selection, CLS removal, pixel shuffle.

The model reaches transformers' vision towers through this file (``nvlm.interop`` reads original InternViT and
release folders into the same ``InternVLVisionModel``). Supported towers: InternViT (transformers'
``InternVLVisionModel``, what NVLM uses), ``SiglipVisionModel`` and ``CLIPVisionModel``. A tile goes in as
[3, S, S] and comes out as (S/patch · downsample)² tokens of width C/downsample² (256 × 4C for 448 px, 14 px
patches, downsample 0.5).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import torch
from torch import nn

from nvlm.vision.pixel_shuffle import pixel_shuffle
from nvlm.vision.tiling import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

# A Hugging Face vision tower (InternVLVisionModel / SiglipVisionModel / CLIPVisionModel or the original
# InternViT), used duck-typed: its config (image_size, patch_size, hidden_size) and forward's hidden states.
VisionTower: TypeAlias = Any

# Normalisation constants each encoder family was trained with.
_MEAN_STD = {
    "internvl": (IMAGENET_MEAN, IMAGENET_STD),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
VisionKind = Literal["internvl", "siglip", "clip"]  # as nvlm.config.VisionConfig.type
_MODEL_TYPES: dict[str, VisionKind] = {
    "internvl_vision": "internvl",
    "internvl": "internvl",
    "siglip_vision_model": "siglip",
    "siglip": "siglip",
    "clip_vision_model": "clip",
    "clip": "clip",
}


def _classes(kind: str) -> tuple[type[PretrainedConfig], type[PreTrainedModel]]:
    import transformers as tf

    return {
        "internvl": (tf.InternVLVisionConfig, tf.InternVLVisionModel),
        "siglip": (tf.SiglipVisionConfig, tf.SiglipVisionModel),
        "clip": (tf.CLIPVisionConfig, tf.CLIPVisionModel),
    }[kind]


def default_mean_std(kind: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return _MEAN_STD[kind]


def vision_config(kind: str, **hf_config: Any) -> Any:
    """An HF vision config object of the given family (for random towers: tiny runs, dry runs)."""
    if kind not in _MEAN_STD:
        raise ValueError(f"vision type must be one of {sorted(_MEAN_STD)}, got {kind!r}")
    return _classes(kind)[0](**hf_config)


def vision_model_from_config(kind: str, hf_config: dict[str, Any]) -> PreTrainedModel:
    """Build a randomly initialised vision tower from its HF config dict (weights are loaded afterwards)."""
    config_cls, model_cls = _classes(kind)
    cfg = dict(hf_config)
    cfg.pop("model_type", None)
    return model_cls(config_cls(**cfg))


def load_vision_model(source: str | os.PathLike | Any) -> tuple[VisionTower, VisionKind]:
    """Load a vision tower from a local HF folder or build one from a config object; returns (model, kind).

    A folder may hold a vision-only model (InternVLVisionModel / SiglipVisionModel / CLIPVisionModel), a full
    SigLIP / CLIP / InternVL-hf model, from which the vision tower is taken, or an original InternViT
    (``nvlm.interop.internvit``: standalone, or an InternVL chat / NVLM-D model's vision_model, dummy heads
    sliced out). Remote code is never run.
    """
    if not isinstance(source, (str, os.PathLike)):  # a PretrainedConfig object: tiny / random models
        kind = _kind_of(source.model_type, str(source))
        return vision_model_from_config(kind, source.to_dict()), kind
    path = Path(source)
    cfg = _config_json(path)
    if _original_internvit(cfg):  # OpenGVLab's remote-code layout: renamed and sliced, its code never run
        from nvlm.interop.internvit import load_original

        return load_original(path, cfg), "internvl"
    kind = _kind_of(cfg.get("model_type", ""), str(path))
    config_cls, model_cls = _classes(kind)
    if cfg.get("model_type") == "internvl":  # full InternVL-hf checkpoint: take the vision tower's weights
        model = vision_model_from_config(kind, cfg["vision_config"])
        _load_prefixed(model, path, ("model.vision_tower.", "vision_tower."))
        return model, kind
    return model_cls.from_pretrained(path, trust_remote_code=False), kind


def load_vision_config(path: str | os.PathLike) -> Any:
    """The vision tower's config object from a local HF folder, reading no weights (for meta-device builds)."""
    cfg = _config_json(Path(path))
    if _original_internvit(cfg):
        from nvlm.interop.internvit import original_vision_config, vit_config_from_original

        return _classes("internvl")[0](**vit_config_from_original(original_vision_config(cfg)))
    if cfg.get("model_type") == "internvl":
        cfg = cfg["vision_config"]
    elif cfg.get("model_type") in ("siglip", "clip"):  # a full two-tower model: its vision half
        cfg = {"model_type": f"{cfg['model_type']}_vision_model", **cfg.get("vision_config", {})}
    kind = _kind_of(cfg.get("model_type", ""), str(path))
    return _classes(kind)[0](**{k: v for k, v in cfg.items() if k != "model_type"})


def _config_json(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"vision encoder {path}: no config.json; give a local Hugging Face model folder")
    return json.loads(cfg_file.read_text())


def _original_internvit(cfg: dict[str, Any]) -> bool:
    """An original InternViT folder (intern_vit_6b) or a remote-code InternVL chat / NVLM-D model."""
    from nvlm.interop.internvit import is_original

    return is_original(cfg)


def _kind_of(model_type: str, where: str) -> VisionKind:
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"vision encoder {where}: model_type {model_type!r} is not supported; use a transformers "
            "InternVL vision (internvl_vision), original InternViT (intern_vit_6b, or an InternVL chat / NVLM-D "
            "folder's vision_model), SigLIP or CLIP model"
        )
    return _MODEL_TYPES[model_type]


def _load_prefixed(model: nn.Module, path: Path, prefixes: tuple[str, ...]) -> None:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        for key, value in load_file(file).items():
            for prefix in prefixes:
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(
            f"vision encoder {path}: weights missing for {missing[:5]} (and {max(0, len(missing) - 5)} more)"
        )


class VisionEncoder(nn.Module):
    """HF vision tower → selected layer → CLS dropped → pixel shuffle. Output: [tiles, tokens, out_dim]."""

    def __init__(self, model: VisionTower, kind: str, select_layer: int = -1, downsample: float = 0.5) -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        self.select_layer = select_layer
        self.downsample = downsample
        cfg = model.config
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        self.tile_size: int = int(size)
        self.grid: int = int(size) // int(patch)
        self.has_cls = kind in ("internvl", "clip")  # SigLIP has no class token
        self.hidden_size: int = cfg.hidden_size
        scale = int(round(1 / downsample))
        self.tokens_per_tile: int = (self.grid // scale) ** 2
        self.out_dim: int = self.hidden_size * scale * scale

    @property
    def layers(self) -> nn.ModuleList:
        """The tower's transformer layers, in order (InternViT names them ``encoder.layer``, SigLIP and CLIP
        ``encoder.layers``)."""
        encoder = self.model.encoder
        return encoder.layer if hasattr(encoder, "layer") else encoder.layers

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        want_hidden = self.select_layer != -1
        out = self.model(pixel_values=pixel_values, output_hidden_states=want_hidden)
        feats = out.hidden_states[self.select_layer] if want_hidden else out.last_hidden_state  # [N, (1+)g², C]
        if self.has_cls:
            feats = feats[:, 1:]  # drop CLS → [N, g², C]
        return pixel_shuffle(feats, self.downsample)  # [N, (g/2)², 4C]
