"""Original (remote-code) InternViT ↔ transformers' ``InternVLVisionModel``: configs, dummy heads, folders.

OpenGVLab's InternViT folders (InternViT-300M-448px, -V2_5, InternViT-6B-448px-V1-5; ``model_type
intern_vit_6b``) and the ``vision_model.*`` of InternVL chat models and of NVLM-D-72B name their weights
``attn.qkv``, ``ls1``, ``norm1`` … (``nvlm.interop.keymap`` maps the names). The tensors differ in one way:

* **Dummy heads.** NVLM-D-72B pads InternViT-6B from 25 to 32 attention heads (7 dummy heads, hard-coded in
  the release's modeling code and in vLLM's NVLM-D loader, for any tower): the fused qkv weight is viewed as
  [3 (q, k, v), 32 heads, head_dim, C] with heads 25…31 the dummies; the q/k RMSNorm weights have 32·head_dim
  entries although their variance is taken over the first 25·head_dim channels only; the output projection
  takes 32·head_dim inputs. Megatron's converter pads with zeros and the tower was frozen in NVLM's training,
  so slicing the 25 real heads out gives exactly the unpadded model; we check the dummies are zero (a warning
  says so if not) and pad with zeros on export. Folders without dummy heads have 3·C qkv rows.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nvlm.interop.keymap import QKV_PARTS, Mapped, original_to_vit
from nvlm.interop.shards import folder_tensors

ORIGINAL_TYPES = ("intern_vit_6b",)  # a standalone original InternViT folder
CHAT_TYPES = ("internvl_chat", "NVLM_D")  # remote-code chat models: their vision_model.* is taken
RELEASE_DUMMY_HEADS = 7  # NVLM-D-72B: 25 → 32 heads; vLLM's NVLM_D_Model hard-codes this number


def side(size: int | Sequence[int]) -> int:
    """A square image or patch size from an HF vision config, which holds an int or [height, width]."""
    return size if isinstance(size, int) else size[0]


# defaults of the original InternVisionConfig, for keys a config.json leaves out
_ORIGINAL_DEFAULTS = dict(
    num_channels=3,
    patch_size=14,
    image_size=224,
    qkv_bias=False,
    hidden_size=3200,
    num_attention_heads=25,
    intermediate_size=12800,
    qk_normalization=True,
    num_hidden_layers=48,
    hidden_act="gelu",
    norm_type="rms_norm",
    layer_norm_eps=1e-6,
    dropout=0.0,
    attention_dropout=0.0,
    initializer_range=0.02,
    initializer_factor=0.1,
)


# ---- configs --------------------------------------------------------------------------------------------------
def vit_config_from_original(original: dict[str, Any]) -> dict[str, Any]:
    """An original InternVisionConfig dict → ``InternVLVisionConfig`` keyword arguments (real head count)."""
    o = {**_ORIGINAL_DEFAULTS, **original}
    size, patch = _int(o["image_size"]), _int(o["patch_size"])
    return dict(
        hidden_size=o["hidden_size"],
        intermediate_size=o["intermediate_size"],
        num_hidden_layers=o["num_hidden_layers"],
        num_attention_heads=o["num_attention_heads"],
        hidden_act=o["hidden_act"],
        norm_type=o["norm_type"],
        layer_norm_eps=o["layer_norm_eps"],
        use_qk_norm=o["qk_normalization"],
        attention_bias=o["qkv_bias"],
        layer_scale_init_value=o["initializer_factor"],  # the original scales ls1/ls2 init by it
        image_size=[size, size],
        patch_size=[patch, patch],
        num_channels=o["num_channels"],
        attention_dropout=o["attention_dropout"],
        hidden_dropout_prob=o["dropout"],
        projection_dropout=0.0,
        initializer_range=o["initializer_range"],
        use_mean_pooling=True,  # the original tower has no final norm; transformers' is Identity then
        use_absolute_position_embeddings=True,
    )


def original_config_from_vit(vit: dict[str, Any], dtype: str | None = None) -> dict[str, Any]:
    """An ``InternVLVisionConfig`` dict → the release's ``vision_config`` (int sizes: vLLM divides them)."""
    if not vit.get("use_mean_pooling", True) or not vit.get("use_absolute_position_embeddings", True):
        raise ValueError(
            "the InternViT tower has a final norm or no absolute position embeddings; the original "
            "InternViT layout (and vLLM's loader) has neither"
        )
    out = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "attention_dropout": vit.get("attention_dropout", 0.0),
        "drop_path_rate": 0.0,
        "dropout": vit.get("hidden_dropout_prob", 0.0),
        "hidden_act": vit.get("hidden_act", "gelu"),
        "hidden_size": vit["hidden_size"],
        "image_size": _int(vit["image_size"]),
        "initializer_factor": vit.get("layer_scale_init_value", 0.1),
        "initializer_range": vit.get("initializer_range", 0.02),
        "intermediate_size": vit["intermediate_size"],
        "layer_norm_eps": vit.get("layer_norm_eps", 1e-6),
        "norm_type": vit.get("norm_type", "layer_norm"),
        "num_attention_heads": vit["num_attention_heads"],
        "num_channels": vit.get("num_channels", 3),
        "num_hidden_layers": vit["num_hidden_layers"],
        "patch_size": _int(vit["patch_size"]),
        "qk_normalization": vit.get("use_qk_norm", False),
        "qkv_bias": vit.get("attention_bias", False),
        "use_flash_attn": True,
    }
    if dtype:
        out["torch_dtype"] = dtype
    return out


def _int(size: Any) -> int:
    return int(size[0] if isinstance(size, (list, tuple)) else size)


# ---- dummy heads ------------------------------------------------------------------------------------------------
def sliced_shape(kind: str | None, shape: tuple[int, ...], heads: int, head_dim: int) -> tuple[int, ...]:
    """Shape of one of our tensors made from an original tensor of `shape` (q/k/v: one part of qkv)."""
    real = heads * head_dim
    if kind in ("qkv", "qk_norm"):
        return (real, *shape[1:])
    if kind == "proj":
        return (shape[0], real)
    return shape


def padded_shape(kind: str | None, shape: tuple[int, ...], heads: int, head_dim: int, dummy: int) -> tuple[int, ...]:
    """Shape of the original tensor made from ours (`shape` = one of q/k/v for qkv) with `dummy` zero heads."""
    total = (heads + dummy) * head_dim
    if kind == "qkv":
        return (3 * total, *shape[1:])
    if kind == "qk_norm":
        return (total,)
    if kind == "proj":
        return (shape[0], total)
    return shape


def take_real_heads(t: torch.Tensor, m: Mapped, heads: int, head_dim: int, where: str = "") -> torch.Tensor:
    """Our tensor `m` out of the original tensor `t`, dummy heads dropped (and checked to be zero)."""
    real = heads * head_dim
    if m.kind == "qkv":
        grouped = t.reshape(3, -1, head_dim, *t.shape[1:])  # [q|k|v, heads + dummy, head_dim, (C)]
        out, dummy = grouped[QKV_PARTS.index(m.part), :heads].reshape(real, *t.shape[1:]), grouped[:, heads:]
    elif m.kind == "qk_norm":
        out, dummy = t[:real], t[real:]
    elif m.kind == "proj":
        out, dummy = t[:, :real], t[:, real:]
    else:
        return t
    if dummy.numel() and bool((dummy != 0).any()):
        warnings.warn(
            f"{where}: its {dummy.shape} dummy-head entries are not all zero (max |x| = "
            f"{dummy.abs().max().item():.3g}); they are dropped, so outputs may differ from the padded "
            "model's",
            stacklevel=2,
        )
    return out.contiguous()


def pad_dummy_heads(kind: str | None, parts: list[torch.Tensor], heads: int, head_dim: int, dummy: int) -> torch.Tensor:
    """The original tensor from ours, zero-padded with `dummy` heads (`parts` = [q, k, v] for qkv)."""
    if kind == "qkv":
        rest = parts[0].shape[1:]
        blocks = [torch.cat([p.reshape(heads, head_dim, *rest), p.new_zeros(dummy, head_dim, *rest)]) for p in parts]
        return torch.stack(blocks).reshape(-1, *rest)
    (t,) = parts
    if kind == "qk_norm":
        return torch.cat([t, t.new_zeros(dummy * head_dim)])
    if kind == "proj":
        return torch.cat([t, t.new_zeros(t.shape[0], dummy * head_dim)], dim=1)
    return t


# ---- original folders as a vision tower ---------------------------------------------------------------------------
def is_original(config: dict[str, Any]) -> bool:
    return config.get("model_type") in ORIGINAL_TYPES + CHAT_TYPES


def original_vision_config(config: dict[str, Any]) -> dict[str, Any]:
    """The original vision config dict of a standalone InternViT folder or of a remote-code chat model."""
    return config["vision_config"] if config.get("model_type") in CHAT_TYPES else config


def load_original(path: str | os.PathLike, config: dict[str, Any]) -> nn.Module:
    """An ``InternVLVisionModel`` holding an original InternViT folder's weights (a standalone tower, or the
    ``vision_model.*`` of an InternVL chat model or NVLM-D release). Reads only the tower's tensors."""
    from transformers import InternVLVisionConfig, InternVLVisionModel

    prefix = "vision_model." if config.get("model_type") in CHAT_TYPES else ""
    vit = InternVLVisionConfig(**vit_config_from_original(original_vision_config(config)))
    heads, head_dim = vit.num_attention_heads, vit.hidden_size // vit.num_attention_heads
    state: dict[str, torch.Tensor] = {}
    for name, ref in folder_tensors(path).items():
        inner = name[len(prefix) :]
        if not name.startswith(prefix) or not inner.startswith(("embeddings.", "encoder.")):
            continue  # the chat model's LLM and projector, or a head outside the tower
        try:
            targets = original_to_vit(inner)
        except KeyError:
            raise ValueError(f"vision encoder {path}: weight {name!r} is not an InternViT weight we know") from None
        tensor = ref.read()
        for m in targets:
            state[m.name] = take_real_heads(tensor, m, heads, head_dim, f"{Path(path).name}:{name}")
    with torch.device("meta"):
        model = InternVLVisionModel(vit)
    model.load_state_dict(state, strict=True, assign=True)  # no buffers in this tower: nothing left on meta
    return model
