"""The vision encoder (paper §4.1): a Hugging Face vision tower, layer selection, CLS removal, pixel shuffle.

The model reaches transformers' vision towers through this file (``nvlm.loading`` reads folders, original
InternViT and release folders included, into the same ``InternVLVisionModel``). Supported towers: InternViT
(transformers' ``InternVLVisionModel``, what NVLM uses), ``SiglipVisionModel`` and ``CLIPVisionModel``. A tile
goes in as [3, S, S] and comes out as (S/patch · downsample)² tokens of width C/downsample² (256 × 4C for 448 px, 14 px
patches, downsample 0.5).
"""

from __future__ import annotations

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


def tile_geometry(hf_config: dict[str, Any], downsample: float) -> tuple[int, int]:
    """(tile size in px, feature tokens per tile) of a vision tower's HF config: (S/patch · downsample)² tokens."""
    size, patch = hf_config["image_size"], hf_config["patch_size"]
    size = int(size if isinstance(size, int) else size[0])
    patch = int(patch if isinstance(patch, int) else patch[0])
    scale = int(round(1 / downsample))
    return size, (size // patch // scale) ** 2


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


def kind_of(model_type: str, where: str) -> VisionKind:
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"vision encoder {where}: model_type {model_type!r} is not supported; use a transformers "
            "InternVL vision (internvl_vision), original InternViT (intern_vit_6b, or an InternVL chat / NVLM-D "
            "folder's vision_model), SigLIP or CLIP model"
        )
    return _MODEL_TYPES[model_type]


class VisionEncoder(nn.Module):
    """HF vision tower → selected layer → CLS dropped → pixel shuffle. Output: [tiles, tokens, out_dim]."""

    def __init__(self, model: VisionTower, kind: str, select_layer: int = -1, downsample: float = 0.5) -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        self.select_layer = select_layer
        self.downsample = downsample
        cfg = model.config
        self.tile_size, self.tokens_per_tile = tile_geometry(cfg.to_dict(), downsample)
        patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        self.grid: int = self.tile_size // int(patch)  # patches per side
        self.has_cls = kind in ("internvl", "clip")  # SigLIP has no class token
        self.hidden_size: int = cfg.hidden_size
        scale = int(round(1 / downsample))
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
